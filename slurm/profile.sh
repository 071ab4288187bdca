# Environment profile: cluster-specific settings every job sources before it starts anything.
# Copy and edit for your cluster (vlm-submit --profile FILE, or VLM_SLURM_PROFILE=FILE for sbatch).
# Keep it to exports and module loads: it runs in the batch shell, before the ranks start.

# Software: modules, then the environment that has vlmtrain installed.
# module load cuda/12.4 nccl
# source /path/to/vlmtrain/.venv/bin/activate

# NCCL: the interface the nodes talk over (ip -br addr on a compute node), and InfiniBand.
# export NCCL_SOCKET_IFNAME=ib0          # or eth0, ens*, ...; also what gloo uses:
# export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
# export NCCL_IB_HCA=mlx5                 # restrict to these HCAs
# export NCCL_DEBUG=WARN                  # INFO prints the rings/trees chosen at init

# The first node's address, when its name does not resolve to the interface above
# (default: the first host of SLURM_JOB_NODELIST).
# export MASTER_ADDR=10.0.0.1

# Extra arguments for every `ray start` of curate.sbatch (e.g. a smaller object store).
# export VLM_RAY_START_ARGS="--object-store-memory=20000000000"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank unless a rank is a whole node
