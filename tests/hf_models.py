"""Tiny configs of the transformers architectures people fine-tune (random weights, nothing
downloaded), with the `--input` specs each takes. Also loadable as factories: `tests/hf_models.py:llama`."""

import torch
import transformers as T

LAYERS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
IDS = "input_ids:batch=2xseq=8:int64"
PIXELS = "pixel_values:batch=2x3x32x32"


WHISPER = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32,
               max_target_positions=32, vocab_size=128, pad_token_id=1, bos_token_id=2, eos_token_id=2,
               decoder_start_token_id=3)
AUDIO = dict(LAYERS, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=2)
SAMPLES = "input_values:batch=2xsamples=400:float32"


def _decoder(config_class, **extra):
    return config_class(vocab_size=128, max_position_embeddings=64, **LAYERS, **extra)


CONFIGS = {
    "BertModel": (lambda: T.BertConfig(vocab_size=128, max_position_embeddings=64, **LAYERS), [IDS]),
    "DistilBertForSequenceClassification": (lambda: T.DistilBertConfig(
        vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64), [IDS]),
    "RobertaForSequenceClassification": (lambda: T.RobertaConfig(vocab_size=128, max_position_embeddings=64, **LAYERS),
                                         [IDS]),
    "GPT2LMHeadModel": (lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64), [IDS]),
    "LlamaForCausalLM": (lambda: _decoder(T.LlamaConfig, num_key_value_heads=2), [IDS]),
    "Qwen2ForCausalLM": (lambda: _decoder(T.Qwen2Config, num_key_value_heads=2), [IDS]),
    "MistralForCausalLM": (lambda: _decoder(T.MistralConfig, num_key_value_heads=2), [IDS]),
    "PhiForCausalLM": (lambda: _decoder(T.PhiConfig), [IDS]),
    "BloomForCausalLM": (lambda: T.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4), [IDS]),
    "T5EncoderModel": (lambda: T.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                       [IDS]),
    "T5ForConditionalGeneration": (lambda: T.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                      num_heads=4), [IDS]),
    "BartModel": (lambda: T.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=64), [IDS]),
    "WhisperEncoder": (lambda: T.WhisperConfig(**WHISPER), ["input_features:batch=2x16x64"]),
    "WhisperForConditionalGeneration": (lambda: T.WhisperConfig(**WHISPER), ["input_features:batch=2x16x64"]),
    "Wav2Vec2Model": (lambda: T.Wav2Vec2Config(**AUDIO), [SAMPLES]),
    "HubertModel": (lambda: T.HubertConfig(**AUDIO), [SAMPLES]),
    "WavLMModel": (lambda: T.WavLMConfig(**AUDIO), [SAMPLES]),
    # transformers 5 runs experts as grouped_mm, which neither exporter takes: ticknorm switches them to batched_mm
    "MixtralForCausalLM": (lambda: _decoder(T.MixtralConfig, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2), [IDS]),
    "Qwen3MoeForCausalLM": (lambda: _decoder(T.Qwen3MoeConfig, num_key_value_heads=2, moe_intermediate_size=16,
                                             num_experts=4, num_experts_per_tok=2, head_dim=8), [IDS]),
    # latent attention: q and kv go through low-rank projections with norms of their own
    "DeepseekV3ForCausalLM": (lambda: _decoder(T.DeepseekV3Config, num_key_value_heads=4, moe_intermediate_size=16,
                                               n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                               first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                               qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8), [IDS]),
    # dynamo cannot capture it (a data-dependent `.item()`): exported by TorchScript instead, as the export says,
    # with static shapes (its ONNX-friendly chunking unfolds by sizes TorchScript must know)
    "LongformerModel": (lambda: T.LongformerConfig(vocab_size=128, max_position_embeddings=64, attention_window=4,
                                                   **LAYERS), ["input_ids:2x8:int64"]),
    "ViTModel": (lambda: T.ViTConfig(image_size=32, patch_size=8, **LAYERS), [PIXELS]),
    "CLIPTextModel": (lambda: T.CLIPTextConfig(vocab_size=128, max_position_embeddings=64, **LAYERS), [IDS]),
    "ConvNextModel": (lambda: T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32), [PIXELS]),
}
DECODERS = ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "PhiForCausalLM",
            "BloomForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"]


def build(architecture: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[architecture][0]()
    if architecture == "WhisperEncoder":
        return T.models.whisper.modeling_whisper.WhisperEncoder(config).eval()
    return getattr(T, architecture)(config).eval()


def llama():
    return build("LlamaForCausalLM")


def norms_that_run(model, feeds: dict) -> set[str]:
    """Paths of the LayerNorm- and RMSNorm-like modules a forward pass on `feeds` runs."""
    ran, handles = set(), []
    for path, module in model.named_modules():
        name = type(module).__name__
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm")):
            handles.append(module.register_forward_hook(lambda m, a, o, path=path: ran.add(path)))
    try:
        with torch.no_grad():
            model(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    finally:
        for handle in handles:
            handle.remove()
    return ran
