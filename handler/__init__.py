"""pagedserve's TorchServe side: the async OpenAI handler, its metrics bridge and the launcher."""
