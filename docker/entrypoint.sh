#!/usr/bin/env bash
# The containers' entrypoint: runs the launcher (python -m handler.launcher) with its flags taken from PAGEDSERVE_*
# environment variables, then the container's arguments. The launcher replaces this shell, so the SIGTERM of
# `docker stop` or Kubernetes reaches it: it lets the requests in flight finish (PAGEDSERVE_DRAIN_TIMEOUT), then
# stops TorchServe and its workers. A PAGEDSERVE_* variable that is not one of these is an error that names it,
# so that a typo is not silently ignored.
set -euo pipefail

args=()
known=()

# value VAR FLAG [DEFAULT]: FLAG with $VAR, or with DEFAULT where VAR is unset; nothing when both are empty.
value() {
    known+=("$1")
    local setting="${!1-${3:-}}"
    if [[ -n "$setting" ]]; then
        args+=("$2" "$setting")
    fi
}

# switch VAR FLAG: FLAG alone where $VAR is true.
switch() {
    known+=("$1")
    case "${!1:-false}" in
        true | 1 | yes) args+=("$2") ;;
        false | 0 | no) ;;
        *) fail "$1 must be true or false, got '${!1}'" ;;
    esac
}

# Kubernetes (and Docker's links) give every pod variables of each Service, named from the Service's name:
# PAGEDSERVE_SERVICE_HOST, PAGEDSERVE_PORT=tcp://..., PAGEDSERVE_PORT_8080_TCP_ADDR and so on.
service_link() {
    case "$1" in
        *_SERVICE_HOST | *_SERVICE_PORT | *_SERVICE_PORT_* | *_PORT_[0-9]*_TCP* | *_PORT_[0-9]*_UDP* | *_PORT_[0-9]*_SCTP*)
            return 0 ;;
    esac
    [[ "${!1}" =~ ^(tcp|udp|sctp):// ]]
}

fail() {
    echo "pagedserve entrypoint: $1" >&2
    exit 2
}

value PAGEDSERVE_MODEL --model_id
value PAGEDSERVE_MODEL_NAME --model_name
value PAGEDSERVE_MODEL_VERSION --model_version
value PAGEDSERVE_CONFIG --config
value PAGEDSERVE_TENSOR_PARALLEL_SIZE --tensor_parallel_size
value PAGEDSERVE_MODEL_STORE --model_store
value PAGEDSERVE_METRICS_CONFIG --metrics_config
value PAGEDSERVE_HOST --host 0.0.0.0
value PAGEDSERVE_MANAGEMENT_HOST --management_host 127.0.0.1
value PAGEDSERVE_METRICS_HOST --metrics_host 0.0.0.0
value PAGEDSERVE_INFERENCE_PORT --inference_port
value PAGEDSERVE_MANAGEMENT_PORT --management_port
value PAGEDSERVE_METRICS_PORT --metrics_port
value PAGEDSERVE_GRPC_INFERENCE_PORT --grpc_inference_port
value PAGEDSERVE_GRPC_MANAGEMENT_PORT --grpc_management_port
value PAGEDSERVE_KEY_DIR --key_dir /var/lib/pagedserve/keys
value PAGEDSERVE_API_KEY_FILE --api_key_file
value PAGEDSERVE_TOKEN_EXPIRATION_MIN --token_expiration_min
value PAGEDSERVE_STARTUP_TIMEOUT --startup_timeout
value PAGEDSERVE_DRAIN_TIMEOUT --drain_timeout
switch PAGEDSERVE_DISABLE_TOKEN_AUTH --disable_token_auth
switch PAGEDSERVE_ENABLE_MODEL_API --enable_model_api
switch PAGEDSERVE_ENABLE_LORA --enable_lora

known+=(PAGEDSERVE_LORA_MODULES)
if [[ -n "${PAGEDSERVE_LORA_MODULES:-}" ]]; then
    read -ra modules <<<"$PAGEDSERVE_LORA_MODULES"
    args+=(--lora_modules "${modules[@]}")
fi

# PAGEDSERVE_ENGINE_MAX_NUM_SEQS=32 becomes --engine.max_num_seqs 32; the launcher rejects an unknown key.
for name in $(compgen -e); do
    if [[ "$name" == PAGEDSERVE_ENGINE_* ]]; then
        key="${name#PAGEDSERVE_ENGINE_}"
        args+=("--engine.${key,,}" "${!name}")
    elif [[ "$name" == PAGEDSERVE_* && " ${known[*]} " != *" $name "* ]] && ! service_link "$name"; then
        fail "unknown variable $name (see docker/README.md for the PAGEDSERVE_* settings)"
    fi
done

echo "pagedserve entrypoint: python -m handler.launcher ${args[*]} $*"
exec python -m handler.launcher "${args[@]}" "$@"
