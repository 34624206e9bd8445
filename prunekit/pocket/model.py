"""The pocket VLM: LLaVA-1.5's architecture at a size a CPU trains (docs/pocket.md, "Model").

``LlavaForConditionalGeneration`` over a ``CLIPVisionModel`` with [CLS] at 336 px / 14 px patches (576
visual tokens), ``vision_feature_layer=-2``, LLaVA's two-layer MLP projector and a small Llama; a word-level
tokenizer trained with ``tokenizers`` on the task vocabulary and saved as ``tokenizer.json``; a
``LlavaProcessor`` with LLaVA-1.5's chat format. ``build_pocket`` makes the untrained model;
``experiments/train_pocket.py`` trains it; the trained checkpoint ships in ``prunekit/pocket/checkpoint``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .scenes import GRID, PATCH, SIZE, vocabulary

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's normalisation, as LLaVA-1.5's image processor
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4)
TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def build_tokenizer():
    """A word-level tokenizer over the task vocabulary (``tokenizers``' WordLevel trainer), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.train_from_iterator([" ".join(vocabulary())], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[
        ("<s>", tk.token_to_id("<s>"))])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="left")


def build_processor(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from ..processors import LLAVA_CHAT_TEMPLATE

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE)


def build_pocket(seed: int = 0, attn_implementation: str = "sdpa", text: dict | None = None):
    """(untrained model, processor) of the pocket architecture; ``text``: overrides of the Llama's config (``TEXT``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = build_tokenizer()
    vision = CLIPVisionConfig(**VISION, image_size=SIZE, patch_size=PATCH, projection_dim=VISION["hidden_size"])
    text = LlamaConfig(**(TEXT | dict(text or {})), vocab_size=len(tok), max_position_embeddings=1024,  # text: overrides
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      image_seq_length=GRID * GRID, vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, build_processor(tok)


def pocket_model_dir() -> Path:
    """The shipped, trained pocket checkpoint (a ``save_pretrained`` directory)."""
    if not (CHECKPOINT_DIR / "config.json").exists():
        raise FileNotFoundError(f"the pocket checkpoint is missing from {CHECKPOINT_DIR}; reinstall prunekit, or "
                                "train it with `python experiments/train_pocket.py` (docs/pocket.md)")
    return CHECKPOINT_DIR
