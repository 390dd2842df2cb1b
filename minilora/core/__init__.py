"""The core: each chapter's idea in one file, read top to bottom, importing only torch (and earlier core files).

    lora.py          chapter 1   LoRALinear (h = W0 x + (α/r) B A x), merge, add_lora with peft's name rule
    adalora.py       chapter 2   SVDLinear (P Λ Q), the orthogonality penalty, importance scores, the cubic
                                 budget schedule, masking, RankAllocator
    nf4.py           chapter 3   NF4 / FP4 / Int4 levels, packing, blockwise quantize_4bit / dequantize_4bit
    double_quant.py  chapter 4   the dynamic 8-bit map, double_quantize / double_dequantize
    paged.py         chapter 5   AdamW on one page, the LRU pool, PagedAdamW (host store + device pool)
    qlora.py         chapter 6   MatMul4bit, Linear4bit, quantize_model, train_step
    memory.py        chapter 7   parameter counts and the seven-part memory estimate

No argument checks beyond an honest precondition, no peft options, no several-adapter bookkeeping, no kernels,
no logging: those are the package around it (minilora/lora.py, nf4.py, ...), which builds on these files, and
tests/test_core.py proves every pair equal. The chapters include their listings from here, and the exercise
stubs in exercises/learner/ are these files with the bodies taken out.
"""
