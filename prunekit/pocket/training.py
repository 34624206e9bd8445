"""Training the pocket VLM in LLaVA's two stages, as Lightning modules (docs/pocket.md, "Training").

1. ``TowerPretraining``: the CLIP tower alone learns the scenes. From [CLS] at the layer LLaVA reads
   (``vision_feature_layer=-2``) it predicts which colour-shape kinds are present (multi-label), so [CLS]
   attention comes to point at the objects; every patch predicts what it shows (colour, colour-shape kind,
   size, object centre: dense labels, so a few thousand pictures suffice).
2. ``InstructionTuning``: the tower frozen, the projector and the Llama learn pocket questions in LLaVA-1.5's
   chat format; the loss is on the answers (and their ``</s>``) only. Several questions share one picture's
   prefix in a sequence, each behind a block mask that shows it the prefix and itself only: every question
   is a single-turn conversation of its own (no answer can be read off another one), at one tower and
   prefix pass per picture. A curriculum first hides most background image tokens from the questions.

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
TURN_TYPES = (*S.QUESTION_TYPES, "caption")


def pixel_values(pixels: np.ndarray) -> torch.Tensor:
    """What the pocket processor makes of a 336 px picture (no resize, no crop: CLIP normalisation only)."""
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - _MEAN) / _STD


class SceneDataset(torch.utils.data.Dataset):
    """Stage 1: picture, multi-hot kinds, the per-patch targets of ``Scene.patch_targets``, and ``window``: the
    tower tokens the sample trains on ([CLS] first, then patches as ``1 + row * 24 + column``).

    The first ``crop_items`` samples are windows of ``crop x crop`` patches around one object: an object's
    silhouette is local, and in a 65-token window its patches are a tenth of the sequence rather than a
    hundredth of the picture's 577, so attention finds them sooner (at about the same cost per object). The
    rest are whole pictures, so that the tower ends on the sequence it will be read on. [CLS]'s kinds are those
    of the objects that show in the window.
    """

    def __init__(self, seed: int, length: int, crop: int = 0, crop_items: int = 0):
        self.seed, self.length, self.crop, self.crop_items = seed, length, crop, crop_items

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        scene = S.draw_scene(rng)
        targets = scene.patch_targets()
        presence = scene.presence()
        window = np.arange(1 + S.GRID * S.GRID)
        if i < self.crop_items:
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            side = S.SIZES[o.size]
            top, left = (o.y - side // 2) // S.PATCH, (o.x - side // 2) // S.PATCH  # the object's first patches
            bottom, right = (o.y + side // 2 - 1) // S.PATCH, (o.x + side // 2 - 1) // S.PATCH
            r0 = int(rng.integers(max(0, bottom - self.crop + 1), min(top, S.GRID - self.crop) + 1))
            c0 = int(rng.integers(max(0, right - self.crop + 1), min(left, S.GRID - self.crop) + 1))
            patches = ((np.arange(self.crop)[:, None] + r0) * S.GRID + np.arange(self.crop) + c0).ravel()
            targets = {k: v[patches] for k, v in targets.items()}
            presence = np.zeros_like(presence)
            presence[np.unique(targets["kind"][targets["kind"] > 0]) - 1] = 1.0  # kinds 1..28 = KINDS order
            window = np.concatenate([[0], 1 + patches])
        return pixel_values(scene.pixels), torch.from_numpy(presence), \
            {k: torch.from_numpy(v) for k, v in targets.items()}, torch.from_numpy(window)


def questions(rng: np.random.Generator, scene: S.Scene, n: int, describe: float = 0.0):
    """``n`` (type, question, answer) about ``scene``, the four question types equally likely (a type the scene
    cannot pose is drawn again), then, with probability ``describe``, one description turn that lists every
    object top to bottom (LLaVA-1.5's mix has detailed descriptions too: one answer that needs every object
    found and placed). A question may repeat: each is a block of its own behind the block mask, so nothing
    leaks, and dropping repeats would skew the answers (a scene has few "yes" existence questions to ask)."""
    qas = []
    for _ in range(4 * n):
        if len(qas) == n:
            break
        kind = S.QUESTION_TYPES[int(rng.integers(len(S.QUESTION_TYPES)))]
        qa = S.ask(rng, scene, kind, S.NEGATIVES[int(rng.integers(3))])
        if qa is not None:
            qas.append((kind, *qa))
    if n and rng.random() < describe:
        qas.append(("caption", S.DESCRIBE, S.caption(scene)))
    return qas


class QuestionDataset(torch.utils.data.Dataset):
    """Stage 2: a picture and ``questions`` about it, packed as one sequence of blocks behind a shared prefix.

    The prefix is ``<s>USER: <image>`` with ``<image>`` expanded to 576 tokens; block ``j`` is the rest of the
    single-turn conversation ``\\n{q} ASSISTANT: {a}</s>``, at the positions it has in that conversation.
    ``segments`` numbers the prefix 0 and the blocks 1, 2, ...; ``block_mask`` turns them into attention that
    shows each block the prefix and itself only, so prefix + block ``j`` is exactly what the processor and chat
    template make of question ``j`` alone (``test_pocket`` checks both). Labels are on the answers only.
    """

    def __init__(self, tokenizer, seed: int, length: int, questions: int, describe: float = 0.0,
                 background_start: float = 1.0, anneal: float = 0.0, objects_start: int = 6, objects_anneal: float = 0.0):
        self.tok, self.seed, self.length, self.questions, self.describe = tokenizer, seed, length, questions, describe
        self.background_start, self.anneal = background_start, anneal
        self.objects_start, self.objects_anneal = objects_start, objects_anneal
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def background_shown(self, i: int) -> float:
        """The share of background image tokens the questions of sample ``i`` may attend to: from
        ``background_start`` up to all of them at ``anneal`` x the run's samples (a linear curriculum)."""
        if self.anneal <= 0:
            return 1.0
        return min(1.0, self.background_start + (1 - self.background_start) * i / (self.anneal * self.length))

    def max_objects(self, i: int) -> int:
        """The most objects a picture of sample ``i`` holds: ``objects_start`` at first, one more at each equal step up to
        6 at ``objects_anneal`` x the run's samples (a curriculum from few objects to many; 0: 6 throughout)."""
        if self.objects_anneal <= 0:
            return 6
        return min(6, self.objects_start + int((7 - self.objects_start) * i / (self.objects_anneal * self.length)))

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        scene = S.draw_scene(rng, max_objects=self.max_objects(i))
        prefix = [self.tok.bos_token_id] + self._ids("USER:") + [self.image_id] * (S.GRID * S.GRID)
        ids, labels, positions, segments, types = list(prefix), [-100] * len(prefix), list(range(len(prefix))), \
            [0] * len(prefix), []
        for j, (kind, question, answer) in enumerate(questions(rng, scene, self.questions, self.describe), 1):
            suffix = "" if kind == "caption" else S.POST_PROMPT
            prompt = self._ids(f"{question}{suffix} ASSISTANT:")
            reply = self._ids(answer) + [self.tok.eos_token_id]
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
            positions += range(len(prefix), len(prefix) + len(prompt) + len(reply))
            segments += [j] * (len(prompt) + len(reply))
            types.append(TURN_TYPES.index(kind))
        # the curriculum: questions see every object token and a share of the background ones (as an oracle pruner
        # would leave them), so that the few tokens that answer are not lost among 576 while retrieval is learnt
        hidden = np.zeros(len(ids), bool)
        shown = self.background_shown(i)
        if shown < 1:
            background = np.flatnonzero(scene.patch_owner() < 0)
            dropped = rng.permutation(background)[:int(round(len(background) * (1 - shown)))]
            hidden[len(prefix) - S.GRID * S.GRID + dropped] = True
        return (pixel_values(scene.pixels), *map(torch.tensor, (ids, labels, positions, segments, types)),
                torch.from_numpy(hidden))

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def block_mask(segments: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, L, L) additive float attention mask from (B, L) segments: causal, and a block (segment > 0) sees
    the prefix (segment 0) and itself only, except the prefix tokens marked ``hidden`` (B, L); a pad (segment
    -1) sees itself only, so no row is empty. Additive rather than boolean: CPU SDPA runs it about 1.3x faster a
    training step."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    shown = (key == 0) if hidden is None else (key == 0) & ~hidden[:, None, :]
    allowed = causal & (shown | (key == query)) & (query >= 0)  # the prefix (0 == 0) sees all of itself
    allowed |= torch.eye(length, dtype=torch.bool)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def collate_questions(batch, pad_id: int):
    """Right-padded (pads: segment -1, position 0, no label); the attention is ``block_mask``."""
    pixels, ids, labels, positions, segments, types, hidden = zip(*batch)
    width = max(len(x) for x in ids)
    hide = torch.zeros((len(ids), width), dtype=torch.bool)
    input_ids = torch.full((len(ids), width), pad_id)
    target = torch.full((len(ids), width), -100)
    position_ids = torch.zeros((len(ids), width), dtype=torch.long)
    segment = torch.full((len(ids), width), -1)
    for b, (x, y, p, g, h) in enumerate(zip(ids, labels, positions, segments, hidden)):
        input_ids[b, :len(x)], target[b, :len(y)], position_ids[b, :len(p)], segment[b, :len(g)] = x, y, p, g
        hide[b, :len(h)] = h
    return torch.stack(pixels), input_ids, block_mask(segment, hide), position_ids, target, list(types)


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


# Offsets (rows, columns) that the heads of the tower's first layers start by looking at: the 4 neighbours, the 4
# diagonal ones, then the 4 at distance 2. Together a patch starts with its 5 x 5 neighbourhood, each direction
# in a head of its own, like a small convolution: an object's silhouette, 3-4 patches across, is in view.
CONV_OFFSETS = (((0, -1), (0, 1), (-1, 0), (1, 0)), ((-1, -1), (-1, 1), (1, -1), (1, 1)),
                ((0, -2), (0, 2), (-2, 0), (2, 0)))


def offset_attention_init(tower: nn.Module, offsets=CONV_OFFSETS, frequencies: int = 8, sharpness: float = 12.0,
                          patch_scale: float = 0.1) -> None:
    """Start the tower's first layers as convolutions (in the spirit of ConViT's positional initialisation).

    With ``sincos_positions``, the position table of patch ``p + o`` is a rotation ``R(o)`` of that of ``p``,
    pairwise on each frequency's (sin, cos). Head ``h`` of layer ``l`` gets ``W_k = s P`` and ``W_q = s P R(o)``,
    with ``P`` the ``frequencies`` highest row and column frequencies: its logit ``q . k`` is then largest on the
    patch at offset ``o = offsets[l][h]``. ``sharpness`` sets s^2 (times the LayerNorm's scale, about 2 here):
    the target then leads its neighbours by a few logits. The patch embedding starts ``patch_scale`` times
    smaller, so that positions dominate the first LayerNorm until the content grows. From a random start a ViT
    takes many hundred steps to find these patterns (docs/pocket.md, "Training runs").
    """
    from transformers.models.clip.modeling_clip import CLIPAttention

    from ..compat import AttentionModule

    width, heads = tower.config.hidden_size, tower.config.num_attention_heads
    head, quarter = width // heads, width // 4
    if 4 * frequencies != head:
        raise ValueError(f"offset heads need 4 x frequencies = head width; got {frequencies} and {head}")
    omega = 1.0 / 10000 ** (torch.arange(frequencies, dtype=torch.float64) / quarter)
    layers = [m for m in tower.modules() if isinstance(m, CLIPAttention)]
    with torch.no_grad():
        for layer, layer_offsets in zip(layers, offsets):
            attention = AttentionModule(layer)
            q, k = attention.projection("q"), attention.projection("k")
            wq, wk = torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64)
            for h, (dr, dc) in enumerate(layer_offsets):
                for axis, d in enumerate((dr, dc)):  # rows use table columns [0, 64), columns [64, 128)
                    for f in range(frequencies):
                        sin_in, cos_in = 2 * axis * quarter + f, (2 * axis + 1) * quarter + f
                        sin_out = h * head + 2 * axis * frequencies + f
                        cos_out = sin_out + frequencies
                        theta = float(omega[f]) * d
                        wk[sin_out, sin_in] = wk[cos_out, cos_in] = 1.0
                        # sin(a + t) = sin a cos t + cos a sin t; cos(a + t) = cos a cos t - sin a sin t
                        wq[sin_out, sin_in], wq[sin_out, cos_in] = math.cos(theta), math.sin(theta)
                        wq[cos_out, sin_in], wq[cos_out, cos_in] = -math.sin(theta), math.cos(theta)
            scale = (sharpness / 2) ** 0.5
            q.weight.copy_(scale * wq), k.weight.copy_(scale * wk), q.bias.zero_(), k.bias.zero_()
        patches = next(m for m in tower.modules() if isinstance(m, nn.Conv2d))
        patches.weight.mul_(patch_scale)


class TowerPretraining(L.LightningModule):
    """Starts the tower's learned position embeddings from a 2-D sine-cosine table and its first layers as
    convolutions (``offset_attention_init``): a from-scratch ViT then sees the silhouettes that tell shapes apart
    from the first step."""

    def __init__(self, model, lr: float, warmup: int, steps: int, weight_decay: float = 0.05, offset_heads: bool = True):
        super().__init__()
        self.vlm = model  # the whole VLM, so the checkpoint keeps one tree; only its tower trains here
        self.tower = model.model.vision_tower
        positions = next(m for n, m in self.tower.named_modules() if n.endswith("position_embedding"))
        with torch.no_grad():
            positions.weight.copy_(sincos_positions(S.GRID, positions.weight.shape[1]))
        if offset_heads:
            offset_attention_init(self.tower)
        width = self.tower.config.hidden_size
        head = lambda n: nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n))  # noqa: E731
        self.heads = nn.ModuleDict({"kinds": head(len(S.KINDS)), "colour": head(len(S.COLOURS) + 1),
                                    "kind": head(len(S.KINDS) + 1), "size": head(len(S.SIZES) + 1),
                                    "centre": head(1)})
        self.lr, self.warmup, self.steps, self.weight_decay = lr, warmup, steps, weight_decay

    def read_layer(self, pixels: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """The tower's hidden state at the layer LLaVA reads (``vision_feature_layer=-2``) on the ``window`` tokens
        of each picture: the encoder layers run on those tokens alone, at their own positions."""
        from ..compat import clip_encoder_layers, clip_input_embeddings, run_encoder_layer

        hidden = clip_input_embeddings(self.tower, pixels)
        hidden = hidden.gather(1, window[..., None].expand(-1, -1, hidden.shape[-1]))
        layers = clip_encoder_layers(self.tower)
        for layer in layers[:len(layers) - 1]:  # hidden_states[-2] is the output of the last layer but one
            hidden = run_encoder_layer(layer, hidden)
        return hidden

    def training_step(self, batch, _):
        pixels, presence, target, window = batch
        hidden = self.read_layer(pixels, window)
        patches = hidden[:, 1:]
        out = {name: head(hidden[:, 0] if name == "kinds" else patches).float() for name, head in self.heads.items()}
        on_object = target["colour"] > 0
        # colour and centre are over every patch; kind and size over the ~6 % of patches that show an object,
        # where the background (which the colour head already separates) cannot drown them
        losses = {
            "kinds": F.binary_cross_entropy_with_logits(out["kinds"], presence),
            "colour": F.cross_entropy(out["colour"].flatten(0, 1), target["colour"].flatten()),
            "kind": F.cross_entropy(out["kind"][on_object], target["kind"][on_object]),
            "size": F.cross_entropy(out["size"][on_object], target["size"][on_object]),
            # about one centre patch per object among 576 (or 64): positives weighted up
            "centre": F.binary_cross_entropy_with_logits(out["centre"][..., 0], target["centre"].float(),
                                                         pos_weight=torch.tensor(10.0)),
        }
        loss = sum(losses.values())
        centre = out["centre"][..., 0]
        self.log_dict({
            "tower/loss": loss,
            "tower/kinds_exact": ((out["kinds"] > 0) == (presence > 0.5)).all(1).float().mean(),
            "tower/patch_colour_acc": (out["colour"].argmax(-1) == target["colour"])[on_object].float().mean(),
            "tower/patch_kind_acc": (out["kind"].argmax(-1) == target["kind"])[on_object].float().mean(),
            "tower/patch_size_acc": (out["size"].argmax(-1) == target["size"])[on_object].float().mean(),
            "tower/centre_recall": (centre > 0)[target["centre"] > 0].float().mean(),
            "tower/centre_false": ((centre > 0) & (target["centre"] == 0)).float().sum(1).mean(),
        }, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [*self.tower.parameters(), *self.heads.parameters()]
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
        """Every ``check_every`` steps, the held-out questions, one picture and one question a sequence, as the
        evaluation asks them."""
        if self.held_out is None or (self.global_step % self.check_every and self.global_step != self.steps):
            return
        pixels, input_ids, mask, positions, labels, types = self.held_out
        with torch.no_grad():
            out = self.vlm(input_ids=input_ids, attention_mask=mask, position_ids=positions, pixel_values=pixels)
        self.log_dict(_accuracies("held_out", out.logits, labels, types))

    def training_step(self, batch, _):
        pixels, input_ids, mask, positions, labels, types = batch
        out = self.vlm(input_ids=input_ids, attention_mask=mask, position_ids=positions, pixel_values=pixels,
                       labels=labels)
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
    model, processor = build_pocket(seed=cfg.seed, text=cfg.get("language_model"))
    if cfg.init_from:  # a saved VLM (e.g. <run>/stage1) to start from instead of the random initialisation
        from transformers import LlavaForConditionalGeneration

        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
                              .state_dict())
    loggers = list(loggers)

    def fit(module, dataset, stage, collate=None, batches=None):
        sizes = dict(batch_sampler=batches) if batches else dict(batch_size=stage.batch_size)
        loader = torch.utils.data.DataLoader(dataset, num_workers=cfg.num_workers, collate_fn=collate,
                                             persistent_workers=False, **sizes)
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # per stage: a stage restarted alone is the same
        trainer = L.Trainer(max_steps=stage.steps, max_epochs=1, accelerator="cpu", precision=cfg.precision,
                            logger=loggers or False, log_every_n_steps=cfg.log_every, enable_checkpointing=False,
                            default_root_dir=cfg.output_dir, gradient_clip_val=1.0)
        trainer.fit(module, loader)

    s1, s2 = cfg.stage1, cfg.stage2
    if s1.steps:
        # crop_steps batches of crop_batch_size windows, then whole_steps batches of batch_size pictures
        whole_steps = min(s1.whole_steps, s1.steps)
        crop_steps = s1.steps - whole_steps
        crops = crop_steps * s1.crop_batch_size
        batches = [list(range(b * s1.crop_batch_size, (b + 1) * s1.crop_batch_size)) for b in range(crop_steps)]
        batches += [list(range(crops + b * s1.batch_size, crops + (b + 1) * s1.batch_size)) for b in range(whole_steps)]
        fit(TowerPretraining(model, s1.lr, s1.warmup, s1.steps, offset_heads=s1.offset_heads),
            SceneDataset(cfg.train_seed, crops + whole_steps * s1.batch_size, s1.crop, crops), s1, batches=batches)
        model.save_pretrained(f"{cfg.output_dir}/stage1")  # fp32: stage 2 can restart from it (init_from)
    pad = processor.tokenizer.pad_token_id
    held_out = QuestionDataset(processor.tokenizer, cfg.train_seed + 2000, s2.held_out, questions=1)
    held_out = collate_questions([held_out[i] for i in range(len(held_out))], pad)
    fit(InstructionTuning(model, s2.lr, s2.warmup, s2.steps, unfreeze=s2.unfreeze_tower_layers,
                          tower_lr_scale=s2.tower_lr_scale, held_out=held_out, check_every=s2.check_every),
        QuestionDataset(processor.tokenizer, cfg.train_seed + 1000, s2.steps * s2.batch_size, s2.questions,
                        s2.describe, s2.background_start, s2.anneal, s2.get("objects_start", 6),
                        s2.get("objects_anneal", 0.0)), s2,
        collate=lambda batch: collate_questions(batch, pad))
    model.to(getattr(torch, cfg.save_dtype)).eval()
    model.config.dtype = cfg.save_dtype
    model.save_pretrained(cfg.save_to)
    processor.save_pretrained(cfg.save_to)
    for logger in loggers:
        logger.finalize("success")
    return str(cfg.save_to)
