"""The runs deepspeed_driver.py makes and test_deepspeed.py checks (no heavy imports: pytest reads it)."""

STEPS, PER_RANK_BATCH = 5, 2
# Patience 1: every other step scores and the next one switches blocks (at steps 1, 3, 5).
COMMON = ["--model", "tiny", "--seq_len", "32", "--eval_every", "0", "--lr", "3e-3", "--sparsity", "0.5",
          "--patience", "1", "--steps", str(STEPS)]
# Embeddings as candidates: step 0 scores with nothing trained (no engine yet) and blocks come and go.
CANDIDATE = ["--embeddings", "candidate"]
# Embeddings always trained: they stay selected across every switch, so their Adam state (and fp32
# masters in bf16) must move from engine to engine.
# They are 91% of the tiny LLaMA and count against the budget: sparsity 0.05 leaves 4% for the rest.
ALWAYS = ["--embeddings", "always", "--sparsity", "0.05"]
FP32_RUNS = {"zero1_fp32": (1, CANDIDATE), "zero2_fp32": (2, ALWAYS), "zero3_fp32": (3, CANDIDATE),
             "zero3_fp32_always": (3, ALWAYS), "zero0_fp32": (0, CANDIDATE)}
# Two micro-batches of one sequence per rank and step: the same rows per step as the runs above.
ACCUM_RUNS = {"zero0_fp32_accum": 0, "zero2_fp32_accum": 2}
ACCUM = ["--batch_size", "1", "--grad_accum", "2"]
# zero2 with embeddings always: their fp32 masters move from engine to engine.
BF16_RUNS = {"zero1_bf16": (1, CANDIDATE), "zero2_bf16": (2, ALWAYS), "zero3_bf16": (3, CANDIDATE)}
RESUMED = ("zero1_fp32", "zero2_fp32", "zero3_fp32_always")
