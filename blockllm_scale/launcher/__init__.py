"""The launcher's world: ``launch/pretrain.py``'s flags (``cli``), train loop (``train``), the backends it drives
(``backends``), data, models, checkpoints, metrics and run folder. A user's own loop needs none of it: the
library is ``blockllm_scale`` (the optimizer) and ``blockllm_scale.integrations`` (DeepSpeed, FSDP2, HF).
Needs the ``[hf]`` extra (transformers, datasets, tokenizers) and, for ``--optimizer`` baselines, ``[baselines]``.
"""

import logging


def quiet_known_import_logs() -> None:
    """Drop the four log lines that importing torchao (through transformers) prints on every start, which
    read like errors and are not: torchao's optional CUDA kernels that this machine cannot load, and
    torch's notice that torchao registers two Enums the old way. Only these messages, only in the launcher:
    the library leaves logging alone."""
    def known(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ((message.startswith("Failed to load") and "torchao" in message and "_C" in message)
                    or ("is an Enum subclass" in message and "register_constant()" in message))

    logging.getLogger("torchao").addFilter(known)
    logging.getLogger("torch.utils._pytree").addFilter(known)


quiet_known_import_logs()  # before anything below imports torchao (through transformers)
