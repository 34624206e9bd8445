"""Training the pocket VLM in LLaVA's two stages, as Lightning modules (docs/pocket.md, "Training").

1. ``TowerPretraining``: the CLIP tower alone learns the scenes. From [CLS] at the layer LLaVA reads
   (``vision_feature_layer=-2``) it predicts which colour-shape kinds are present (multi-label), so [CLS]
   attention comes to point at the objects; every patch predicts the colour and shape it shows (dense
   labels, so a few thousand pictures suffice).
2. ``InstructionTuning``: the tower frozen, the projector and the Llama learn multi-turn conversations of
   pocket questions with LLaVA-1.5's chat format; the loss is on the answers (and their ``</s>``) only.

Scenes are drawn on the fly from ``(seed, index)``, so a run is reproducible and never repeats a picture.
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import scenes as S
from .model import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)
TYPE_MIX = ("existence", "existence", "attribute", "counting", "spatial")  # 40 % existence, as the eval split
TURN_TYPES = (*S.QUESTION_TYPES, "caption")


def pixel_values(pixels: np.ndarray) -> torch.Tensor:
    """What the pocket processor makes of a 336 px picture (no resize, no crop: CLIP normalisation only)."""
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - _MEAN) / _STD


class SceneDataset(torch.utils.data.Dataset):
    """Stage 1: picture, multi-hot kinds, per-patch colour and shape classes."""

    def __init__(self, seed: int, length: int):
        self.seed, self.length = seed, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        scene = S.draw_scene(np.random.default_rng([self.seed, i]))
        colour, shape = scene.patch_labels()
        return pixel_values(scene.pixels), torch.from_numpy(scene.presence()), torch.from_numpy(colour), \
            torch.from_numpy(shape)


def conversation(rng: np.random.Generator, scene: S.Scene, turns: int, describe: float = 0.5):
    """Up to ``turns`` distinct (type, question, answer) about ``scene``, types drawn as in the eval split.

    With probability ``describe`` the conversation is instead one description turn that lists every object top
    to bottom (LLaVA-1.5's mix has detailed descriptions too): one answer that needs every object found and
    placed. It is a conversation of its own: placed before questions, it would answer them in the text, and
    the model would learn to read its own description instead of the picture.
    """
    if turns and rng.random() < describe:
        return [("caption", S.DESCRIBE, S.caption(scene))]
    qas, seen = [], set()
    for _ in range(4 * turns):
        if len(qas) == turns:
            break
        kind = TYPE_MIX[int(rng.integers(len(TYPE_MIX)))]
        qa = S.ask(rng, scene, kind, S.NEGATIVES[int(rng.integers(3))])
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            qas.append((kind, *qa))
    return qas


class ConversationDataset(torch.utils.data.Dataset):
    """Stage 2: picture and a tokenised multi-turn conversation, labels on the answers only.

    The text is what the processor and chat template make of it (``USER: <image>\\n{q} ASSISTANT: {a}</s>``
    per turn, ``<image>`` expanded to 576 tokens); ``test_pocket`` checks the two agree.
    """

    def __init__(self, tokenizer, seed: int, length: int, turns: int, describe: float = 0.5):
        self.tok, self.seed, self.length, self.turns, self.describe = tokenizer, seed, length, turns, describe
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        scene = S.draw_scene(rng)
        ids, labels, types = [self.tok.bos_token_id], [-100], []
        for t, (kind, question, answer) in enumerate(conversation(rng, scene, self.turns, self.describe)):
            image = "<image>\n" if t == 0 else ""
            suffix = "" if kind == "caption" else S.POST_PROMPT
            prompt = self._ids(f"USER: {image}{question}{suffix} ASSISTANT:")
            if t == 0:
                at = prompt.index(self.image_id)
                prompt[at:at + 1] = [self.image_id] * (S.GRID * S.GRID)
            reply = self._ids(answer) + [self.tok.eos_token_id]
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
            types.append(TURN_TYPES.index(kind))
        return pixel_values(scene.pixels), torch.tensor(ids), torch.tensor(labels), torch.tensor(types)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def collate_conversations(batch, pad_id: int):
    """Right-padded: under a causal mask no real token sees a pad, so training may drop the mask (see
    ``InstructionTuning.training_step``)."""
    pixels, ids, labels, types = zip(*batch)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id)
    target = torch.full((len(ids), width), -100)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for b, (x, y) in enumerate(zip(ids, labels)):
        input_ids[b, :len(x)], target[b, :len(y)], mask[b, :len(x)] = x, y, 1
    return torch.stack(pixels), input_ids, mask, target, list(types)


def _schedule(optimizer, warmup: int, steps: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """(1 + grid^2, width): [CLS] zeros, then MAE's fixed 2-D sine-cosine table (half the width per axis), row-major."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = [f(axis.flatten()[:, None] * omega) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), torch.cat(parts, 1)]).float()


class TowerPretraining(L.LightningModule):
    """Starts the tower's learned position embeddings from a 2-D sine-cosine table: a from-scratch ViT then
    learns which patches are neighbours (the silhouettes that tell shapes apart) in a few hundred steps."""

    def __init__(self, model, lr: float, warmup: int, steps: int, weight_decay: float = 0.05):
        super().__init__()
        self.vlm = model  # the whole VLM, so the checkpoint keeps one tree; only its tower trains here
        self.tower = model.model.vision_tower
        positions = next(m for n, m in self.tower.named_modules() if n.endswith("position_embedding"))
        with torch.no_grad():
            positions.weight.copy_(sincos_positions(S.GRID, positions.weight.shape[1]))
        width = self.tower.config.hidden_size
        self.kinds = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(S.KINDS)))
        self.colour = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(S.COLOURS) + 1))
        self.shape = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(S.SHAPES) + 1))  # class 0 unused
        self.lr, self.warmup, self.steps, self.weight_decay = lr, warmup, steps, weight_decay

    def training_step(self, batch, _):
        pixels, presence, colour, shape = batch
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # LLaVA's layer
        kinds = self.kinds(hidden[:, 0]).float()
        colours, shapes = self.colour(hidden[:, 1:]).float(), self.shape(hidden[:, 1:]).float()
        on_object = colour > 0
        # the shape loss is over the object patches only: on the ~6 % of patches that show an object it would
        # otherwise be drowned by the background, which the colour head already separates
        loss = (F.binary_cross_entropy_with_logits(kinds, presence) + F.cross_entropy(colours.flatten(0, 1), colour.flatten())
                + F.cross_entropy(shapes[on_object], shape[on_object]))
        self.log_dict({
            "tower/loss": loss,
            "tower/kinds_exact": ((kinds > 0) == (presence > 0.5)).all(1).float().mean(),
            "tower/patch_colour_acc": (colours.argmax(-1) == colour)[on_object].float().mean(),
            "tower/patch_shape_acc": (shapes.argmax(-1) == shape)[on_object].float().mean(),
        }, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [*self.tower.parameters(), *self.kinds.parameters(), *self.colour.parameters(), *self.shape.parameters()]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.98))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": _schedule(optimizer, self.warmup, self.steps),
                                                         "interval": "step"}}


def _accuracies(prefix: str, logits, labels, types) -> dict:
    """Answer accuracy (every answer token and its </s> predicted, teacher forcing) overall and per turn type."""
    hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == -100)
    answered = labels[:, 1:] != -100
    correct, kinds = [], []
    for b in range(len(types)):
        starts = answered[b] & ~F.pad(answered[b], (1, 0))[:-1]  # first token of each answer
        spans = torch.cumsum(starts.long(), 0) * answered[b]
        for t in range(len(types[b])):
            correct.append(hit[b][spans == t + 1].all())
            kinds.append(types[b][t])
    correct, kinds = torch.stack(correct).float(), torch.stack(kinds)
    questions = kinds < len(S.QUESTION_TYPES)  # the description turns are logged apart
    logs = {f"{prefix}/acc": correct[questions].mean()} if questions.any() else {}
    for k, name in enumerate(TURN_TYPES):
        if (kinds == k).any():
            logs[f"{prefix}/acc_{name}"] = correct[kinds == k].mean()
    return logs


class InstructionTuning(L.LightningModule):
    """The projector and the Llama train; the tower is frozen except its last ``unfreeze`` layers below the one
    LLaVA reads (they train at ``tower_lr_scale`` x the rate, so the answers can sharpen what the tower sees)."""

    def __init__(self, model, lr: float, warmup: int, steps: int, weight_decay: float = 0.0, unfreeze: int = 0,
                 tower_lr_scale: float = 0.2, held_out=None, check_every: int = 100):
        super().__init__()
        self.vlm = model
        self.held_out, self.check_every = held_out, check_every  # a collated batch of single-turn questions
        tower = model.model.vision_tower
        tower.requires_grad_(False).eval()
        layers = next(m for n, m in tower.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList))
        read = len(layers) + 1 + model.config.vision_feature_layer  # layers up to the hidden state LLaVA reads
        self.tower_params = [p for layer in layers[max(0, read - unfreeze):read] for p in layer.parameters()]
        for p in self.tower_params:
            p.requires_grad_(True)
        self.lr, self.warmup, self.steps, self.weight_decay = lr, warmup, steps, weight_decay
        self.tower_lr_scale = tower_lr_scale

    def on_train_epoch_start(self):
        self.vlm.model.vision_tower.eval()  # frozen: no dropout, no statistics

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Every ``check_every`` steps, the held-out questions one at a time, as the evaluation asks them (the
        training batches' own accuracy is over multi-turn conversations)."""
        if self.held_out is None or (self.global_step % self.check_every and self.global_step != self.steps):
            return
        pixels, input_ids, mask, labels, types = self.held_out
        with torch.no_grad():
            out = self.vlm(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        self.log_dict(_accuracies("held_out", out.logits, labels, types))

    def training_step(self, batch, _):
        pixels, input_ids, _mask, labels, types = batch
        # the batch is right-padded and the loss ignores pads: without a mask, attention is plainly causal, which
        # gives the same logits at every real token and lets SDPA skip the upper triangle (~15 % a step on CPU)
        out = self.vlm(input_ids=input_ids, pixel_values=pixels, labels=labels)
        logs = {"vqa/loss": out.loss} | _accuracies("vqa", out.logits, labels, types)
        self.log_dict(logs, prog_bar=True)
        return out.loss

    def configure_optimizers(self):
        tower = {id(p) for p in self.tower_params}
        rest = [p for p in self.vlm.parameters() if p.requires_grad and id(p) not in tower]
        groups = [{"params": rest}] + ([{"params": self.tower_params, "lr": self.lr * self.tower_lr_scale}]
                                       if self.tower_params else [])
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.98))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": _schedule(optimizer, self.warmup, self.steps),
                                                         "interval": "step"}}


def train(cfg, loggers: list = ()) -> str:
    """Both stages from the ``train_pocket`` config, logged to ``loggers`` (Lightning's); saves the checkpoint
    (weights + processor) to ``cfg.save_to``."""
    from .model import build_pocket

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    model, processor = build_pocket(seed=cfg.seed)
    if cfg.init_from:  # a saved VLM (e.g. <run>/stage1) to start from instead of the random initialisation
        from transformers import LlavaForConditionalGeneration

        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
                              .state_dict())
    loggers = list(loggers)

    def fit(module, dataset, stage, collate=None):
        loader = torch.utils.data.DataLoader(dataset, batch_size=stage.batch_size, num_workers=cfg.num_workers,
                                             collate_fn=collate, persistent_workers=False)
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # per stage: a stage restarted alone is the same
        trainer = L.Trainer(max_steps=stage.steps, max_epochs=1, accelerator="cpu", precision=cfg.precision,
                            logger=loggers or False, log_every_n_steps=cfg.log_every, enable_checkpointing=False,
                            default_root_dir=cfg.output_dir, gradient_clip_val=1.0)
        trainer.fit(module, loader)

    s1, s2 = cfg.stage1, cfg.stage2
    if s1.steps:
        fit(TowerPretraining(model, s1.lr, s1.warmup, s1.steps), SceneDataset(cfg.train_seed, s1.steps * s1.batch_size),
            s1)
        model.save_pretrained(f"{cfg.output_dir}/stage1")  # fp32: stage 2 can restart from it (init_from)
    pad = processor.tokenizer.pad_token_id
    held_out = ConversationDataset(processor.tokenizer, cfg.train_seed + 2000, s2.held_out, turns=1, describe=0.0)
    held_out = collate_conversations([held_out[i] for i in range(len(held_out))], processor.tokenizer.pad_token_id)
    fit(InstructionTuning(model, s2.lr, s2.warmup, s2.steps, unfreeze=s2.unfreeze_tower_layers,
                          tower_lr_scale=s2.tower_lr_scale, held_out=held_out, check_every=s2.check_every),
        ConversationDataset(processor.tokenizer, cfg.train_seed + 1000, s2.steps * s2.batch_size, s2.turns,
                            s2.describe), s2,
        collate=lambda batch: collate_conversations(batch, pad))
    model.to(getattr(torch, cfg.save_dtype)).eval()
    model.config.dtype = cfg.save_dtype
    model.save_pretrained(cfg.save_to)
    processor.save_pretrained(cfg.save_to)
    for logger in loggers:
        logger.finalize("success")
    return str(cfg.save_to)
