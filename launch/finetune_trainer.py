"""Supervised fine-tuning of a causal LM with BlockLLM through the Hugging Face Trainer.

    python launch/finetune_trainer.py                     # CPU: tiny LLaMA, the shipped corpus, 20 steps
    python launch/finetune_trainer.py --model path/to/hf_model --data train.jsonl --max_steps 1000 --bf16
    deepspeed launch/finetune_trainer.py --deepspeed configs/ds/trainer_zero2.json --bf16 --gradient_checkpointing
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/finetune_trainer.py --gradient_checkpointing

--data: a .txt file (one document) or .json/.jsonl rows with a "text" field (--text_field);
the text is packed into rows of --seq_len tokens. --model: a local Hugging Face model (with its tokenizer)
or a size from blockllm_scale/launcher/models.py built from its config (random weights, the shipped tokenizer).
Every TrainingArguments flag works (--learning_rate, --save_steps, --resume_from_checkpoint, --report_to, ...);
--deepspeed takes any ZeRO-0..3 config ("auto" values are filled by the Trainer). On CPU, add
DS_ACCELERATOR=cpu and use `deepspeed --num_gpus 2 --no_local_rank` or `torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from blockllm_scale.launcher.data import SHIPPED_CORPUS, SHIPPED_TOKENIZER
from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator, without_zero_init
from blockllm_scale.launcher.models import MODEL_SIZES, build_model
from blockllm_scale.parallel import end_with_a_barrier


@dataclass
class Script:
    model: str = "tiny"  # a local Hugging Face model, or a size from blockllm_scale/launcher/models.py
    data: str = str(SHIPPED_CORPUS)
    text_field: str = "text"
    seq_len: int = 128
    sparsity: float = 0.9  # BlockLLM: fraction of parameters frozen each step
    patience: int = 50  # BlockLLM: reselect when the loss stops beating its mean over this many steps


def packed(texts: list[str], tokenizer, seq_len: int) -> dict[str, list[list[int]]]:
    """Documents tokenized, joined by EOS and cut into rows of seq_len tokens (the tail is dropped)."""
    ids = list(chain.from_iterable(row + [tokenizer.eos_token_id] for row in tokenizer(texts)["input_ids"]))
    return {"input_ids": [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]}


def main() -> None:
    parser = HfArgumentParser((Script, TrainingArguments))
    parser.set_defaults(output_dir="runs/finetune", max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                        logging_steps=5, save_steps=10, report_to="none")
    script, args = parser.parse_args_into_dataclasses()
    sized = script.model in MODEL_SIZES
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER) if sized else script.model)
    with without_zero_init(args):  # BlockLLM sizes its blocks from whole weights; ZeRO-3 shards them later
        model = build_model(script.model, len(tokenizer)) if sized else AutoModelForCausalLM.from_pretrained(script.model)
    kind = "json" if script.data.endswith((".json", ".jsonl")) else "text"
    data = load_dataset(kind, data_files=script.data, split="train", **({"sample_by": "document"} if kind == "text" else {}))
    data = data.map(lambda rows: packed(rows[script.text_field], tokenizer, script.seq_len), batched=True,
                    remove_columns=data.column_names).with_format("torch")
    trainer = BlockLLMTrainer(model=model, args=args, train_dataset=data, data_collator=causal_lm_collator,
                              processing_class=tokenizer,
                              blockllm_settings={"sparsity": script.sparsity, "patience": script.patience})
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    end_with_a_barrier()  # or the Trainer's last all_gather can abort a finished rank at exit (parallel.py)


if __name__ == "__main__":
    main()
