"""CHOP + distill: continued pretraining of a chopped student with an uncompressed, frozen teacher.

Loss (the paper's terms, each weight from the ``distill`` section of ``params.yaml``)::

    w_lm  * CE(student)
  + w_kl  * tau^2 * KL(teacher || student)                  next-token distributions, temperature tau
  + w_hid * sum_k MSE(H_t^{m(k)}, H_s^k W_hid^k)              decoder-layer outputs, learned projections
  + w_att * sum_k MSE(A_t^{m(k)}, A_s^k)                      attention-block outputs (after o_proj)
  + w_emb * MSE(E_t, E_s W_emb)                              embedding tables, learned projection

``m(k)`` sends student layer ``k`` to the teacher layer it was copied from (the chop metadata). Activations
are captured with forward hooks, so SDPA/flash attention work unchanged (no attention matrices). The LM
and KL terms come from the final hidden states in token chunks (:func:`layerchop.train.losses.chunked_lm_kl`).

The student and the projections live in :class:`DistillStudent`, which is what the optimizer, the
checkpoints and FSDP2 see; the teacher is held outside the module tree, so it is never trained, never
checkpointed, and Lightning's ``.train()`` never reaches it. Only the student is exported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from layerchop.data.prepare import IGNORE_INDEX
from layerchop.prune.chop import decoder_layers
from layerchop.train.losses import chunked_lm_kl, embedding_mse, layer_sum_mse
from layerchop.train.module import CausalLMModule


def layer_map(student_meta: dict, num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer, from the chop metadata (identity for an unchopped student).

    Raises:
        ValueError: when the metadata does not describe a chop of a ``num_teacher_layers``-layer model
            into ``num_student_layers`` layers.
    """
    removed = student_meta.get("removed_layers")
    if not removed:
        if num_student_layers != num_teacher_layers:
            raise ValueError(
                f"student has {num_student_layers} layers, teacher {num_teacher_layers}, and the student's "
                "layerchop.json names no removed_layers to map one onto the other"
            )
        return list(range(num_student_layers))
    before = int(student_meta.get("num_layers_before", num_teacher_layers))
    if before != num_teacher_layers:
        raise ValueError(f"the student was chopped from a {before}-layer model; the teacher has "
                         f"{num_teacher_layers} layers")
    kept = [i for i in range(num_teacher_layers) if i not in set(removed)]
    if len(kept) != num_student_layers:
        raise ValueError(f"removed_layers={removed} leaves {len(kept)} layers; the student has {num_student_layers}")
    return kept


def logit_scale(config) -> float:
    """The factor the family applies to ``final norm output @ head`` before the softmax (Granite divides by
    ``logits_scaling``; 1 elsewhere): the distillation losses compute the logits themselves, chunk by chunk."""
    return 1.0 / float(getattr(config, "logits_scaling", None) or 1.0)


def _scaled(weight: torch.Tensor, scale: float) -> torch.Tensor:
    return weight if scale == 1.0 else weight * scale  # no copy of the head where the family does not scale


def check_distill_family(student_config, teacher_config) -> None:
    """Refuse a student or teacher whose logits the chunked LM/KL loss cannot reproduce: a soft-capped head
    (Gemma-2's ``final_logit_softcapping``) is ``tanh``-shaped, not linear."""
    from layerchop.families import TESTED

    for who, config in (("--init", student_config), ("--teacher", teacher_config)):
        if config.model_type not in TESTED:
            raise ValueError(f"--objective distill: {who} is a {config.model_type}, not a tested family: the chunked "
                             "LM/KL loss computes the head's logits itself and knows the logit transforms of the "
                             f"tested families only ({', '.join(TESTED)})")
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            raise ValueError(f"--objective distill: {who} is a {config.model_type} with final_logit_softcapping={cap}; "
                             "the chunked LM/KL loss computes linear logits (distillation of soft-capped models is not "
                             "supported)")


def final_norm(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.norm


class Capture:
    """Forward hooks keeping decoder-layer outputs, attention-block outputs and the final normed hidden.

    Hooks record only while :attr:`active`: with activation checkpointing the layers run again in the
    backward pass, and those recomputed outputs must not be kept.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], hidden: bool, attention: bool):
        blocks = decoder_layers(model)
        self.active = True
        self.hidden: dict[int, torch.Tensor] = {}
        self.attn: dict[int, torch.Tensor] = {}
        self.final: Optional[torch.Tensor] = None
        self.handles = []
        for i in layers:
            if hidden:
                self.handles.append(blocks[i].register_forward_hook(self._keep(self.hidden, i)))
            if attention:
                self.handles.append(blocks[i].self_attn.register_forward_hook(self._keep(self.attn, i)))
        self.handles.append(final_norm(model).register_forward_hook(self._keep_final))

    def _keep(self, store: dict, i: int):
        def hook(module, args, output):
            if self.active:
                store[i] = output[0] if isinstance(output, tuple) else output  # [B, T, D]

        return hook

    def _keep_final(self, module, args, output) -> None:
        if self.active:
            self.final = output

    def clear(self) -> None:
        self.hidden.clear()
        self.attn.clear()
        self.final = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _identity_or_default(d_in: int, d_out: int) -> nn.Linear:
    proj = nn.Linear(d_in, d_out, bias=False)
    if d_in == d_out:
        with torch.no_grad():
            nn.init.eye_(proj.weight)
    return proj


@dataclasses.dataclass
class TeacherOut:
    """What the student's forward needs from the teacher (no gradients)."""

    capture: Capture
    head_VD: Optional[torch.Tensor]
    embed_VD: Optional[torch.Tensor]


class DistillStudent(nn.Module):
    """The student plus the learned projections; its ``forward`` computes every loss term.

    Everything that touches the student's root-level weights (embedding, final norm, head) happens inside
    this module's ``forward``, so under FSDP2 (this module is the root) they are unsharded when used.

    Args:
        student: HF causal LM.
        teacher_hidden: Teacher hidden size (projections are ``D_s -> D_t``, identity when equal).
        mapping: Teacher layer of each student layer.
        cfg: :class:`layerchop.config.DistillConfig`.
    """

    def __init__(self, student: nn.Module, teacher_hidden: int, mapping: Sequence[int], cfg):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.mapping = list(mapping)
        d_s = student.config.hidden_size
        n = len(decoder_layers(student))
        if len(self.mapping) != n:
            raise ValueError(f"layer map has {len(self.mapping)} entries for a {n}-layer student")
        if cfg.w_att and d_s != teacher_hidden:
            raise ValueError(f"distill.w_att={cfg.w_att} needs equal hidden sizes (student {d_s}, teacher "
                             f"{teacher_hidden}): the attention term has no projection")
        self.hid_proj = nn.ModuleList([_identity_or_default(d_s, teacher_hidden) for _ in range(n)])
        self.emb_proj = _identity_or_default(d_s, teacher_hidden)
        self.capture = Capture(student, range(n), hidden=bool(cfg.w_hid), attention=bool(cfg.w_att))
        self.term_scales: Optional[dict[str, float]] = None
        """``distill.balance: initial``: each term's factor beyond its weight (None: not measured yet, or not
        balanced); a plain attribute, kept in the Lightning checkpoint by :class:`DistillModule`."""

    def weight(self, name: str) -> float:
        """The weight of term ``name`` (``lm``, ``kl``, ``hid``, ``att``, ``emb``): ``w_<name>``, times its
        balancing scale when there is one."""
        w = float(getattr(self.cfg, f"w_{name}"))
        return w * self.term_scales.get(name, 1.0) if self.term_scales else w

    def needs_scales(self) -> bool:
        return self.cfg.balance == "initial" and self.term_scales is None

    @property
    def config(self):
        return self.student.config

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                teacher: Optional[TeacherOut] = None, use_cache: bool = False):
        if teacher is None:  # plain LM forward (validation): nothing to capture
            self.capture.active = False
            return self.student(input_ids=input_ids, labels=labels, use_cache=False)
        input_ids_BT, labels_BT = input_ids, labels
        cfg = self.cfg
        B, T = input_ids_BT.shape
        real_BT = labels_BT != IGNORE_INDEX  # real tokens (the packed tail is padding)
        targets_BT = torch.cat([labels_BT[:, 1:], torch.full_like(labels_BT[:, :1], IGNORE_INDEX)], dim=1)
        self.capture.clear()
        self.capture.active = True
        no_logits = torch.zeros(0, dtype=torch.long, device=input_ids_BT.device)
        self.student(input_ids=input_ids_BT, logits_to_keep=no_logits, use_cache=False)
        self.capture.active = False  # activation checkpointing re-runs the layers in backward: keep nothing
        cap_s, cap_t = self.capture, teacher.capture
        terms: dict[str, torch.Tensor] = {}
        total = None
        if cfg.w_lm or cfg.w_kl:
            h_s = cap_s.final.reshape(B * T, -1)
            h_t = cap_t.final.reshape(B * T, -1) if cfg.w_kl else None
            total, lm, kl = chunked_lm_kl(
                h_s, _scaled(self.student.get_output_embeddings().weight, logit_scale(self.student.config)),
                targets_BT.reshape(-1),
                h_t_ND=h_t, w_t_VD=teacher.head_VD, kl_mask_N=real_BT.reshape(-1),
                temperature=cfg.temperature, w_lm=self.weight("lm"), w_kl=self.weight("kl"), chunk=cfg.chunk_tokens,
            )
            if cfg.w_lm:
                terms["lm"] = lm
            if cfg.w_kl:
                terms["kl"] = kl
        if cfg.w_hid:
            terms["hid"] = layer_sum_mse([cap_s.hidden[k] for k in range(len(self.mapping))],
                                         [cap_t.hidden[m] for m in self.mapping], list(self.hid_proj), real_BT)
        if cfg.w_att:
            terms["att"] = layer_sum_mse([cap_s.attn[k] for k in range(len(self.mapping))],
                                         [cap_t.attn[m] for m in self.mapping], None, real_BT)
        if cfg.w_emb:
            terms["emb"] = embedding_mse(teacher.embed_VD, self.student.get_input_embeddings().weight, self.emb_proj)
        for name in ("hid", "att", "emb"):
            if name in terms:
                weighted = self.weight(name) * terms[name]
                total = weighted if total is None else total + weighted
        cap_s.clear()
        return total, {k: v.detach() for k, v in terms.items()}


NEGLIGIBLE = 1e-6
"""``distill.balance: initial``: a term at most this fraction of the reference term on the first batch counts as 0."""


def balance_scales(terms: dict[str, float]) -> dict[str, float]:
    """``distill.balance: initial``: each term's scale, (reference term / that term), from the terms' values on the
    first batch; the reference is the LM term (the largest term when ``w_lm`` is 0), whose scale is 1. A term that
    starts at 0 up to rounding (at most :data:`NEGLIGIBLE` of the reference: the embedding term of a student that kept
    the teacher's table, which bf16 autocast makes ~1e-9 instead of 0) keeps scale 1: it has no magnitude to balance,
    and its inverse would blow up once the term moves.

    Raises:
        ValueError: when a term is negative or not finite, or no term is positive.
    """
    import math

    for name, value in terms.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"distill.balance: initial: the {name} term is {value} on the first batch; it cannot be "
                             "balanced (use distill.balance: none)")
    if not any(v > 0 for v in terms.values()):
        raise ValueError("distill.balance: initial: every term is 0 on the first batch (nothing to balance)")
    ref = terms["lm"] if terms.get("lm", 0) > 0 else max(terms.values())
    return {name: (ref / value if value > NEGLIGIBLE * ref else 1.0) for name, value in terms.items()}


def _fsdp_call(module: nn.Module, name: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        getattr(module, name)()


def distill_step(student: DistillStudent, teacher: nn.Module, teacher_capture: Capture,
                 input_ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Teacher forward (no grad), then the student's forward with every loss term.

    Returns:
        ``(total, terms)``: the weighted loss and the detached unweighted terms by name.
    """
    cfg = student.cfg
    teacher_capture.clear()
    need_teacher = bool(cfg.w_kl or cfg.w_hid or cfg.w_att or cfg.w_emb)
    if need_teacher:
        with torch.no_grad():
            no_logits = torch.zeros(0, dtype=torch.long, device=input_ids_BT.device)
            teacher(input_ids=input_ids_BT, logits_to_keep=no_logits, use_cache=False)
    # the teacher's head and embedding are used inside the student's forward: keep them gathered until then
    _fsdp_call(teacher, "unshard")
    try:
        out = TeacherOut(
            teacher_capture,
            head_VD=(_scaled(teacher.get_output_embeddings().weight.detach(), logit_scale(teacher.config))
                     if cfg.w_kl else None),
            embed_VD=teacher.get_input_embeddings().weight.detach() if cfg.w_emb else None,
        )
        total, terms = student(input_ids_BT, labels_BT, teacher=out)
    finally:
        _fsdp_call(teacher, "reshard")
        teacher_capture.clear()
    return total, terms


def teacher_capture(teacher: nn.Module, mapping: Sequence[int], cfg) -> Capture:
    return Capture(teacher, sorted(set(mapping)), hidden=bool(cfg.w_hid), attention=bool(cfg.w_att))


def freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def distill_step_flops(student_config, teacher_config, mapping: Sequence[int], cfg, batch_size: int,
                       seq_len: int) -> int:
    """Measured FLOPs of one distillation micro-batch: student forward + backward (with projections and
    the chunked head) and teacher forward."""
    from layerchop.train.flops import measure, measured, meta_model

    def count() -> int:
        with torch.device("meta"):
            student = DistillStudent(meta_model(student_config), teacher_config.hidden_size, mapping, cfg)
        teacher = freeze(meta_model(teacher_config))
        cap = teacher_capture(teacher, mapping, cfg)
        x_BT = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
        return measure(lambda: distill_step(student, teacher, cap, x_BT, x_BT)[0])

    return measured("distill", (student_config.to_json_string(use_diff=False),
                                teacher_config.to_json_string(use_diff=False), list(mapping),
                                dataclasses.asdict(cfg), batch_size, seq_len), count)


class DistillModule(CausalLMModule):
    """:class:`CausalLMModule` with a frozen teacher and the distillation loss.

    Shares the data module, optimizer, schedule, logging, compute accounting and export with the
    continued-pretraining module; overrides only the model construction and the training loss.

    Args:
        model_dir: The chopped student's initial weights.
        teacher_dir: The uncompressed teacher.
        cfg: :class:`layerchop.config.TrainConfig`.
        distill_cfg: :class:`layerchop.config.DistillConfig`.
        mapping: Teacher layer of each student layer (:func:`layer_map`).
        max_steps: Optimizer steps.
        student, teacher: Already-built models to use instead of loading the directories (tests).
    """

    no_decay_prefixes = ("hid_proj.", "emb_proj.")  # the projections start at identity: no pull to zero

    def __init__(self, model_dir, teacher_dir, cfg, distill_cfg, mapping: Sequence[int], max_steps: int,
                 student: Optional[nn.Module] = None, teacher: Optional[nn.Module] = None):
        super().__init__(model_dir, cfg, max_steps=max_steps)
        self.teacher_dir = teacher_dir
        self.distill_cfg = distill_cfg
        self.mapping = list(mapping)
        # outside the module tree: no optimizer state, no checkpoint entries, never put in train mode (the
        # student enters the tree as part of ``self.model`` in configure_model)
        object.__setattr__(self, "_student_init", student)
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "teacher_capture", None)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        from layerchop.train import sharding

        mesh = self.data_parallel_mesh()
        student, teacher = self._student_init, self.teacher
        # built here from the directories, not handed in (tests): their weights come from the checkpoints
        student_built, teacher_built = student is None, teacher is None
        if student is None:
            student = (AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32) if mesh is None
                       else sharding.empty_model(AutoConfig.from_pretrained(self.model_dir)))
        if teacher is None:
            teacher = (AutoModelForCausalLM.from_pretrained(self.teacher_dir, dtype=torch.float32) if mesh is None
                       else sharding.empty_model(AutoConfig.from_pretrained(self.teacher_dir)))
        student.config.use_cache = False
        if self.cfg.activation_checkpointing:
            sharding.enable_activation_checkpointing(student)
        object.__setattr__(self, "teacher", freeze(teacher))
        object.__setattr__(self, "teacher_capture", teacher_capture(teacher, self.mapping, self.distill_cfg))
        self.model = DistillStudent(student, teacher.config.hidden_size, self.mapping, self.distill_cfg)
        self.model.train()
        if mesh is None:
            return
        # the frozen teacher has no backward: its layers free their gathered parameters after the forward
        for m, layers, reshard in ((self.model, decoder_layers(student), self.cfg.fsdp_reshard),
                                   (teacher, decoder_layers(teacher), "forward")):
            sharding.apply_fsdp2(m, mesh, self.cfg.fsdp_param_dtype, self.cfg.fsdp_reduce_dtype, layers=layers,
                                 reshard=reshard)
            sharding.materialize(m, self.device)
        if student_built:
            sharding.load_broadcast(self.model, self.model_dir, prefix="student.",
                                    not_in_checkpoint=("hid_proj.", "emb_proj."))
        if teacher_built:
            sharding.load_broadcast(teacher, self.teacher_dir)

    def on_fit_start(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.teacher, FSDPModule):  # FSDP2 already placed the shards
            self.teacher.to(self.device)
        loaded = getattr(self, "_loaded_scales", None)
        if loaded is not None and self.model.term_scales is None:  # a resumed balanced run: its first step's scales
            self.model.term_scales = dict(loaded)

    def measure_scales(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """``distill.balance: initial``: the unweighted terms on ``batch`` before any update (no gradient), averaged
        over ranks, turned into :func:`balance_scales` (every rank gets the same)."""
        import torch.distributed as dist

        with torch.no_grad():
            _, terms = distill_step(self.model, self.teacher, self.teacher_capture, batch["input_ids"],
                                    batch["labels"])
        names = sorted(terms)
        values = torch.stack([terms[k].float() for k in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= dist.get_world_size()
        return balance_scales({k: float(v) for k, v in zip(names, values.tolist())})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.model.needs_scales():  # the first step of a balanced run (a resumed one has them)
            self.model.term_scales = self.measure_scales(batch)
            if self.trainer.is_global_zero:
                print("[distill] balance: initial: term scales " +
                      ", ".join(f"{k} {v:.4g}" for k, v in self.model.term_scales.items()), flush=True)
        total, terms = distill_step(self.model, self.teacher, self.teacher_capture, batch["input_ids"],
                                    batch["labels"])
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, on_step=True, on_epoch=False)
        return total

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distill_term_scales"] = self.model.term_scales

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        scales = checkpoint.get("distill_term_scales")
        # FSDP2 (ModelParallelStrategy) restores the checkpoint after on_fit_start, one device before it: set the
        # scales on the model where it exists already, and keep them for on_fit_start otherwise
        object.__setattr__(self, "_loaded_scales", scales)
        if scales is not None and self.model is not None:
            self.model.term_scales = dict(scales)

    def export_record(self) -> dict:
        """What the export's ``layerchop.json`` records beyond the plan: the balancing scales (when measured)."""
        scales = self.model.term_scales if self.model is not None else None
        return {} if not scales else {"distill_term_scales": scales}

    def export_state(self):
        """The student alone (no projections): ``(config, full state dict)``; a collective under FSDP2."""
        from layerchop.train.sharding import full_state_dict, reshard

        reshard(self.model)
        sd = full_state_dict(self.model)
        prefix = "student."
        return self.model.student.config, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_layer_map(student_dir: str | Path, teacher_dir: str | Path) -> list[int]:
    """:func:`layer_map` from the two directories' configs and the student's ``layerchop.json``."""
    from transformers import AutoConfig

    from layerchop.io import read_metadata

    return layer_map(read_metadata(student_dir), AutoConfig.from_pretrained(student_dir).num_hidden_layers,
                     AutoConfig.from_pretrained(teacher_dir).num_hidden_layers)
