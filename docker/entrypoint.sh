#!/bin/sh
# qlorax container entry point: maps the image's mount points and the reference images'
# environment variables onto qlorax overrides, then runs qlorax.
#
#   docker run [-e STANDALONE_DOCKER=TRUE] [-e WORKER_COUNT_DOCKER=N] [-e QLORAX_RUN_NAME=NAME] \
#       [-v MODEL_DIR:/qlorax/model] [-v DATA_DIR:/qlorax/data] [-v OUT_DIR:/qlorax/outputs] \
#       IMAGE [COMMAND] [OVERRIDES...]
#
# COMMAND is a qlorax command: train, run, merge, verify, plan, runs (a leading `qlorax` is
# dropped). Mapping, added after the user's overrides and only for keys the user did not set:
#
#   train, run, plan:
#     /qlorax/model holds anything            -> model.path=/qlorax/model
#     /qlorax/data holds exactly one entry    -> data.path=/qlorax/data/<entry>  (a json/jsonl/csv/parquet
#                                                file, or a datasets.save_to_disk folder)
#     /qlorax/data holds several entries      -> data.path=/qlorax/data when it is itself a
#                                                datasets.save_to_disk folder; otherwise an error
#                                                asking for data.path=/qlorax/data/<file>
#   train, run:
#     /qlorax/outputs is a folder             -> run_dir=/qlorax/outputs/$QLORAX_RUN_NAME
#                                                (default <command>-<UTC date-time>); the image creates
#                                                it, so mount a volume there to keep the results
#   merge, verify (with QLORAX_RUN_NAME set)  -> run_dir=/qlorax/outputs/$QLORAX_RUN_NAME
#   runs (no folder given)                    -> runs /qlorax/outputs
#   "lost+found" and names starting with "." are ignored when counting entries. The data
#   templates still come from the overrides (e.g. data=english_quotes or data=local data.prompt=...).
#
# STANDALONE_DOCKER=TRUE (as in the reference images): this container is the whole job.
#   No COMMAND (no argument, or overrides only) runs `run` (train -> merge -> verify), and WORKER_COUNT_DOCKER=N with N > 1 adds
#   `parallel=ccl workers=N` (N ranks in this container, oneCCL when installed, else gloo).
#   Without STANDALONE_DOCKER=TRUE, WORKER_COUNT_DOCKER is ignored (with a notice), as in the reference.
#
# Anything else passes straight through: no argument or a flag goes to qlorax unchanged
# (`--help`), and an executable name runs that program (`bash`, `python ...`).
# For tests: QLORAX_MOUNT_ROOT (default /qlorax) and QLORAX_BIN (default qlorax).
set -eu

root=${QLORAX_MOUNT_ROOT:-/qlorax}
qlorax_bin=${QLORAX_BIN:-qlorax}

say() { echo "qlorax-entrypoint: $*" >&2; }

# has_key KEY ARGS...: true when an override for KEY (KEY=... or a Hydra +/++KEY=...) is among ARGS.
has_key() {
    key=$1
    shift
    for arg in "$@"; do
        case "$arg" in
            "$key"=* | "+$key"=* | "++$key"=*) return 0 ;;
        esac
    done
    return 1
}

# entries DIR: the names in DIR that count (no dotfiles, no lost+found), one per line.
entries() {
    for path in "$1"/*; do
        [ -e "$path" ] || continue
        name=${path##*/}
        [ "$name" = "lost+found" ] && continue
        echo "$name"
    done
}

is_true() {
    case "$1" in
        TRUE | True | true | 1 | yes | YES) return 0 ;;
    esac
    return 1
}

standalone=false
if is_true "${STANDALONE_DOCKER:-}"; then
    standalone=true
fi

if [ "${1:-}" = "qlorax" ]; then
    shift
fi

# Overrides with no command in front (`IMAGE data=english_quotes`, as the README shows): the standalone
# container runs them as `run`; otherwise qlorax itself says a command is missing.
case "${1:-}" in
    -*) ;;
    *=*)
        if [ "$standalone" = true ]; then
            set -- run "$@"
        fi
        ;;
esac

if [ $# -eq 0 ]; then
    if [ "$standalone" = true ]; then
        set -- run
    else
        exec $qlorax_bin    # unquoted on purpose: QLORAX_BIN may be "python -m qlorax"
    fi
fi

command=$1
case "$command" in
    train | run | merge | verify | plan | runs) shift ;;
    -*) exec $qlorax_bin "$@" ;;
    *)
        if command -v "$command" >/dev/null 2>&1; then
            exec "$@"
        fi
        exec $qlorax_bin "$@"
        ;;
esac

# The user's overrides first, then what the mounts and variables add (appended to "$@").
if [ "$command" = train ] || [ "$command" = run ] || [ "$command" = plan ]; then
    if [ -d "$root/model" ] && [ -n "$(entries "$root/model")" ] && ! has_key model.path "$@"; then
        set -- "$@" "model.path=$root/model"
    fi
    if [ -d "$root/data" ] && ! has_key data.path "$@"; then
        found=$(entries "$root/data")
        count=$(printf '%s' "$found" | grep -c . || true)
        if [ "$count" -eq 1 ]; then
            set -- "$@" "data.path=$root/data/$found"
        elif [ "$count" -gt 1 ]; then
            if [ -f "$root/data/dataset_info.json" ] || [ -f "$root/data/dataset_dict.json" ] \
                || [ -f "$root/data/state.json" ]; then
                set -- "$@" "data.path=$root/data"
            else
                say "$root/data holds several entries ($(echo "$found" | tr '\n' ' ')); choose one with data.path=$root/data/<name>"
                exit 2
            fi
        fi
    fi
fi

run_name=${QLORAX_RUN_NAME:-}
case "$command" in
    train | run)
        if [ -d "$root/outputs" ] && ! has_key run_dir "$@"; then
            set -- "$@" "run_dir=$root/outputs/${run_name:-$command-$(date -u +%Y%m%d-%H%M%S)}"
        fi
        ;;
    merge | verify)
        if [ -n "$run_name" ] && ! has_key run_dir "$@"; then
            set -- "$@" "run_dir=$root/outputs/$run_name"
        fi
        ;;
    runs)
        if [ $# -eq 0 ] && [ -d "$root/outputs" ]; then
            set -- "$@" "$root/outputs"
        fi
        ;;
esac

workers=${WORKER_COUNT_DOCKER:-}
if [ -n "$workers" ]; then
    case "$workers" in
        *[!0-9]* | 0*)
            say "WORKER_COUNT_DOCKER must be a whole number >= 1, got '$workers'"
            exit 2
            ;;
    esac
    if [ "$standalone" != true ]; then
        say "WORKER_COUNT_DOCKER=$workers is only honoured with STANDALONE_DOCKER=TRUE; ignoring it"
    elif [ "$workers" -gt 1 ] && { [ "$command" = train ] || [ "$command" = run ] || [ "$command" = plan ]; }; then
        has_key parallel "$@" || set -- "$@" "parallel=ccl"
        has_key workers "$@" || set -- "$@" "workers=$workers"
    fi
fi

say "$qlorax_bin $command $*"
exec $qlorax_bin "$command" "$@"
