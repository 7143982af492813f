"""Native CPU code (C++ built with torch.utils.cpp_extension): paged attention, the fused elementwise ops and a
decoder stack that runs all layers of a step in one call. Built on first use, cached on disk (build.py)."""
