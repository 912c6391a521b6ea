"""A worked example of a new training method in one file: continued pretraining with the token embeddings frozen
(``--objective frozen-embeddings``). Its class says everything the pipeline asks of a method; the base class
(:class:`layerchop.train.methods.Method`, plain continued pretraining) gives the rest."""

from __future__ import annotations

from layerchop.train.methods import Method
from layerchop.train.module import CausalLMModule


class FrozenEmbeddingsModule(CausalLMModule):
    """The LM objective; the input embedding gets no gradient and no optimizer state."""

    def configure_model(self) -> None:
        super().configure_model()
        self.model.get_input_embeddings().weight.requires_grad_(False)


class FrozenEmbeddings(Method):
    name = "frozen-embeddings"
    phases = False  # its module does not take a previous phase's state

    def identity(self, settings, teacher_dir, teacher_meta, total_steps):
        return {"frozen": ["embeddings"]}  # a run of this method never resumes from another method's checkpoint

    def module(self, plan, start):
        return FrozenEmbeddingsModule(plan.init_dir, plan.cfg, max_steps=plan.steps.main_steps)

    def card(self, plan, metadata):
        metadata["frozen"] = ["embeddings"]
        return "Continued causal-LM pretraining with the token embeddings frozen"
