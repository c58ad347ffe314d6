import os
def test_env():
    print(sorted((k, v) for k, v in os.environ.items() if k.startswith(("RANK","LOCAL","WORLD","MASTER","ACCELERATE","DS_","FSDP","CUDA","OMP","TORCH"))))
