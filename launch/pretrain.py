"""Pre-train a LLaMA with BlockLLM or a baseline optimizer: the one entry point.

    python launch/pretrain.py                                   # tiny LLaMA, shipped corpus, CPU or 1 GPU
    python launch/pretrain.py --model 60m --steps 10000 --batch_size 64 --grad_accum 2 --dtype bf16
    python launch/pretrain.py --optimizer galore --model 130m   # the baselines take the same flags
    deepspeed launch/pretrain.py --ds_config configs/ds/zero1.json
    torchrun --nproc_per_node 2 launch/pretrain.py --backend fsdp2
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/pretrain.py
    python launch/pretrain.py --resume auto                     # continue the newest intact checkpoint of --out_dir
    python launch/pretrain.py --help                            # every flag, with its default

The train loop, its flags and its backends live in ``blockllm_scale.launcher`` (installed with
``pip install -e ".[launcher]"``; the README's install line has it).
"""

from blockllm_scale.launcher.train import main

if __name__ == "__main__":
    main()
