#!/bin/sh
# Entrypoint of the moe_dist images.
#   docker run IMAGE train configs/demo.yaml     -> moe-dist train configs/demo.yaml
#   docker run IMAGE launch CLUSTER.yaml -- ...  -> moe-dist launch ...
#   docker run IMAGE python -m torch.distributed.run ...   -> that program (compose, k8s, srun)
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ] || ! command -v "$1" >/dev/null 2>&1; then
    exec moe-dist "$@"
fi
exec "$@"
