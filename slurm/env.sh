# Environment of every ark_mega SLURM job, in one place. Anything here can be overridden by
# exporting it before `sbatch` (sbatch passes the submitting environment through).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP overlap wants 1
export PYTHONUNBUFFERED=1
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME: set them for your network if the default is wrong
