"""torchrun --nproc-per-node 2 examples/pretrain_gpt.py --config configs/cpu_tp2.yaml

Megatron-Core GPT pretraining on the embedded data, TP=2 on CPU (megatron-core CPU mode over gloo).
Prepare the data first: `mates-lab embedded --out data/embedded`. Variants:

    torchrun --nproc-per-node 2 examples/pretrain_gpt.py --config configs/cpu_tp2.yaml \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2          # PP=2
    torchrun --nproc-per-node 2 examples/pretrain_gpt.py --config configs/cpu_tp2.yaml \
        --tensor-model-parallel-size 1                                           # DP=2

On GPUs, drop CPU mode: --no-cpu (or `parallel.cpu: false` in your config); not yet run on a GPU here. The
paper settings (configs/paper_410m.yaml, configs/paper_1b.yaml) are selection sections for Megatron-LM's own
pretrain_gpt.py: see examples/megatron_lm/README.md.

Resume: add --save DIR (and --save-interval N); run again with --load DIR.
The training loop itself is mates_megatron.training.loop.Trainer; this script is its command line.
"""

from mates_megatron.pretrain import main

if __name__ == "__main__":
    main()
