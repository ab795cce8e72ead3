"""finetune: sequential full fine-tuning of every backbone parameter (the naive lower bound).

CLIP's temperature (``logit_scale``) stays frozen, as in most CLIP fine-tuning; a linear head,
where present, trains with the backbone. One AdamW per experience (rebuilt by the loop):
``torch.optim.AdamW`` (decay first, ``p *= 1 - lr wd``; eps = 1e-8 after the bias correction),
with HF Trainer's weight-decay groups: no decay for norm layers' weights and biases nor for any
parameter named ``*bias*`` (the base :meth:`Strategy.make_optimizer`; docs/optimizers.md).

Federation (issue 19): a client sends every trained tensor under its state_dict name (the base
:meth:`Strategy.federated_tensors`: the whole backbone but ``logit_scale``, and a linear head), the
"federated full fine-tuning" FLoRA (arXiv 2404.15182) compares LoRA against.
"""

from __future__ import annotations

from cl_bench.backbones.base import Backbone
from cl_bench.heads import Head
from cl_bench.registry import STRATEGIES
from cl_bench.strategy import Strategy, StrategyConfig, StrategyContext


@STRATEGIES.register("finetune", description="baseline: full fine-tuning of all backbone parameters")
class Finetune(Strategy):
    paper = "sequential fine-tuning (the standard naive continual-learning baseline)"
    default_lr = 1e-5
    graph_safe = True
    graphs_span_experiences = True
    default_weight_decay = 0.0

    def __init__(self, cfg: StrategyConfig, backbone: Backbone, head: Head, ctx: StrategyContext) -> None:
        super().__init__(cfg, backbone, head, ctx)
        for name, param in self.backbone.model.named_parameters():
            param.requires_grad_(name != "logit_scale")
