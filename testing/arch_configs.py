"""A tiny config.json for every Mixture-of-Experts model file of mlx-lm, for the architecture tests
and the architecture table (docs/store.md). Sizes follow mlx-lm's own tests, shrunk; "<vocab>"
becomes the local tokenizer's vocabulary size. Architectures flashmesh cannot run are in REFUSED,
those that cannot be built here in NOT_CHECKED, each with the reason, so that a new mlx-lm model
file is covered or explained, never unnoticed.
"""

from __future__ import annotations

V = "<vocab>"

_DEEPSEEK_MLA = {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16}
_DEEPSEEK_V3 = {
    "vocab_size": V, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
    "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "moe_layer_freq": 1, "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    **_DEEPSEEK_MLA,
}  # fmt: skip
_YARN = {
    "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "type": "yarn",
}  # fmt: skip
_QWEN3_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "head_dim": 16, "vocab_size": V,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts_per_tok": 2, "num_experts": 8,
    "moe_intermediate_size": 64, "rope_theta": 1000, "max_position_embeddings": 512,
    "tie_word_embeddings": False, "norm_topk_prob": True,
}  # fmt: skip
_LINEAR_ATTN = {
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4, "full_attention_interval": 2, "partial_rotary_factor": 0.5, "head_dim": 32,
}  # fmt: skip
_QWEN_NEXT = {
    "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": V, "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
    "shared_expert_intermediate_size": 64, "mlp_only_layers": [], "moe_intermediate_size": 64,
    "rms_norm_eps": 1e-05, "rope_theta": 1000.0, "max_position_embeddings": 512, "norm_topk_prob": True,
    **_LINEAR_ATTN,
}  # fmt: skip
_KIMI_LINEAR = {
    "model_type": "kimi_linear", "vocab_size": V, "hidden_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "head_dim": 16,
    "rope_theta": 100.0, "rms_norm_eps": 1e-06, "model_max_length": 512, "num_experts": 8,
    "num_experts_per_token": 2, "moe_intermediate_size": 64, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "linear_attn_config": {"num_heads": 4, "head_dim": 16, "kda_layers": [2], "short_conv_kernel_size": 4},
    "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
}  # fmt: skip
_MISTRAL4 = {
    "model_type": "mistral4", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-06, "topk_group": 1, "num_experts_per_tok": 2,
    "first_k_dense_replace": 1, "n_group": 1, **_DEEPSEEK_MLA,
    "rope_parameters": {
        **_YARN, "rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "llama_4_scaling_beta": 0.1,
    },
}  # fmt: skip
_GEMMA4_MOE = {
    "model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "moe_intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
    "num_global_key_value_heads": 1, "head_dim": 32, "global_head_dim": 32, "sliding_window": 8,
    "sliding_window_pattern": 2, "layer_types": ["sliding_attention", "full_attention"],
    "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "vocab_size": V, "tie_word_embeddings": True,
    "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
}  # fmt: skip

_LONGCAT = {
    "model_type": "longcat_flash", "attention_method": "MLA", "zero_expert_type": "identity",
    "hidden_size": 64, "ffn_hidden_size": 128, "moe_topk": 2, "expert_ffn_hidden_size": 64,
    "n_routed_experts": 8, "zero_expert_num": 2, "num_layers": 2, "num_hidden_layers": 2, "vocab_size": V,
    "max_position_embeddings": 512, "num_attention_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "routed_scaling_factor": 1.0,
    "rms_norm_eps": 1e-05, "rope_theta": 1000, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
    "attention_bias": False,
}  # fmt: skip

TINY_CONFIGS: dict[str, dict] = {
    "Klear": {
        "model_type": "Klear", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 4, "attention_bias": False, "mlp_only_layers": [0], "num_experts": 8,
        "num_experts_per_tok": 2, "decoder_sparse_step": 2, "n_shared_experts": 1, "moe_intermediate_size": 64,
        "rms_norm_eps": 1e-05, "vocab_size": V, "num_key_value_heads": 4, "rope_theta": 1000.0,
        "max_position_embeddings": 512, "norm_topk_prob": True,
    },
    "afmoe": {
        "model_type": "afmoe", "vocab_size": V, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16, "rope_theta": 100.0,
        "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    },
    "bailing_hybrid": {
        "model_type": "bailing_hybrid", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8,
        "num_experts_per_tok": 2, "num_shared_experts": 1, "n_group": 2, "topk_group": 1,
        "first_k_dense_replace": 1, "layer_group_size": 2, "group_norm_size": 1, "vocab_size": V,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "max_position_embeddings": 512, "routed_scaling_factor": 2.5,
        "head_dim": 16, **_DEEPSEEK_MLA,
    },
    "bailing_moe": {
        "model_type": "bailing_moe", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 512,
        "moe_intermediate_size": 64, "num_experts": 8, "num_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05, "rope_theta": 1000, "vocab_size": V, "first_k_dense_replace": 1,
    },
    "bailing_moe_linear": {
        "model_type": "bailing_moe_linear", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_experts_per_tok": 2, "num_experts": 8, "norm_topk_prob": True,
        "num_shared_experts": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-05,
        "vocab_size": V, "rope_theta": 1000, "first_k_dense_replace": 0, "layer_group_size": 2,
        "group_norm_size": 1, "max_position_embeddings": 512,
    },
    "bailing_moe_v3": {
        "model_type": "bailing_moe_v3", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "n_group": 2, "topk_group": 1, "layer_group_size": 2, "head_dim": 16, "max_position_embeddings": 512,
        **_DEEPSEEK_MLA,
    },
    "dbrx": {
        "model_type": "dbrx", "d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": V,
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000},
    },
    "deepseek": {
        "model_type": "deepseek", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
    },
    "deepseek_v2": {
        **_DEEPSEEK_V3, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "rope_scaling": _YARN,
    },
    "deepseek_v3": {**_DEEPSEEK_V3, "model_type": "deepseek_v3"},
    "deepseek_v32": {
        **_DEEPSEEK_V3, "model_type": "deepseek_v32", "index_head_dim": 32, "index_n_heads": 2, "index_topk": 4,
    },
    "deepseek_v41": {
        "model_type": "deepseek_v41", "vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "head_dim": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "o_groups": 2,
        "o_lora_rank": 32, "moe_intermediate_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "sliding_window": 16, "hc_mult": 2, "hc_sinkhorn_iters": 3, "index_n_heads": 2, "index_head_dim": 16,
        "index_topk": 8, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    },
    "dots1": {
        "model_type": "dots1", "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
        "num_attention_heads": 4, "rms_norm_eps": 1e-05, "vocab_size": V, "max_position_embeddings": 512,
        "num_key_value_heads": 2, "first_k_dense_replace": 1, "moe_intermediate_size": 64, "n_routed_experts": 8,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_experts_per_tok": 2, "rope_theta": 1000,
        "routed_scaling_factor": 1.0,
    },
    "ernie4_5_moe": {
        "model_type": "ernie4_5_moe", "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "rms_norm_eps": 1e-05,
        "vocab_size": V, "rope_theta": 1000, "use_bias": False, "tie_word_embeddings": False,
        "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 64, "moe_layer_start_index": 1,
    },
    "exaone_moe": {
        "model_type": "exaone_moe", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "sliding_window": 8,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-05, "rope_theta": 1000.0,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "is_moe_layer": [False, True, True, True], "tie_word_embeddings": False,
    },
    "gemma4": {"model_type": "gemma4", "vocab_size": V, "text_config": _GEMMA4_MOE},
    "gemma4_text": _GEMMA4_MOE,
    "glm4_moe": {
        "model_type": "glm4_moe", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "max_position_embeddings": 512, "moe_intermediate_size": 64, "norm_topk_prob": True,
        "num_attention_heads": 4, "n_group": 2, "head_dim": 16, "topk_group": 1, "n_shared_experts": 1,
        "n_routed_experts": 8, "routed_scaling_factor": 1.0, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "num_hidden_layers": 3, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000,
        "rope_scaling": None, "use_qk_norm": True, "tie_word_embeddings": False, "attention_bias": False,
        "partial_rotary_factor": 0.5,
    },
    "glm4_moe_lite": {
        "model_type": "glm4_moe_lite", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 1.0, "kv_lora_rank": 8,
        "q_lora_rank": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 8, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "max_position_embeddings": 256, "rms_norm_eps": 1e-05,
        "rope_theta": 1000, "rope_scaling": None, "attention_bias": False, "partial_rotary_factor": 1.0,
        "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
    },
    "glm_moe_dsa": {
        **_DEEPSEEK_V3, "model_type": "glm_moe_dsa", "index_head_dim": 32, "index_n_heads": 2, "index_topk": 4,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "attention_bias": False,
    },
    "gpt_oss": {
        "model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 8,
        "num_experts_per_tok": 2, "sliding_window": 16, "rope_theta": 10000, "vocab_size": V,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "granitemoe": {
        "model_type": "granitemoe", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 4, "rms_norm_eps": 1e-05, "vocab_size": V, "logits_scaling": 1.0,
        "attention_multiplier": 1.0, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
        "max_position_embeddings": 512, "num_key_value_heads": 2, "attention_bias": False, "rope_theta": 1000,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    "granitemoehybrid": {
        "model_type": "granitemoehybrid", "vocab_size": V, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "max_position_embeddings": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "attention_bias": False, "embedding_multiplier": 1.0, "attention_multiplier": 1.0, "logits_scaling": 1.0,
        "residual_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2,
        "shared_intermediate_size": 64, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_proj_bias": False,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": False,
        "layer_types": ["mamba", "attention"], "rms_norm_eps": 1e-05, "rope_theta": 1000.0,
    },
    "hunyuan": {
        "model_type": "hunyuan", "hidden_size": 64, "attention_bias": False, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 0.0001,
        "rope_theta": 1000, "vocab_size": V, "moe_topk": 2, "num_experts": 8, "num_shared_expert": 1,
        "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_cla": True, "cla_share_factor": 2,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
    },
    "jamba": {
        "model_type": "jamba", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attn_layer_offset": 1, "attn_layer_period": 2,
        "expert_layer_offset": 1, "expert_layer_period": 2, "mamba_d_conv": 4, "mamba_d_state": 16,
        "mamba_expand": 2, "num_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-05,
        "max_position_embeddings": 512, "vocab_size": V,
    },
    "kimi_k25": {"model_type": "kimi_k25", "text_config": {**_DEEPSEEK_V3, "model_type": "deepseek_v3"}},
    "kimi_k3": {"model_type": "kimi_k3", "text_config": _KIMI_LINEAR},
    "kimi_linear": _KIMI_LINEAR,
    "kimi_vl": {"model_type": "kimi_vl", "text_config": {**_DEEPSEEK_V3, "model_type": "deepseek_v3"}},
    "laguna": {
        "model_type": "laguna", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-06, "sliding_window": 4, "partial_rotary_factor": 0.5, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
        "moe_routed_scaling_factor": 2.5, "moe_router_score_func": "sqrtsoftplus",
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse"], "num_attention_heads_per_layer": [4, 4, 4],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        },
    },
    "lfm2_moe": {
        "model_type": "lfm2_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "norm_eps": 1e-05, "vocab_size": V,
        "full_attn_idxs": [0, 2], "rope_theta": 10000, "max_position_embeddings": 512, "conv_bias": True,
        "conv_L_cache": 3, "moe_intermediate_size": 64, "num_dense_layers": 1, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "use_expert_bias": True,
    },
    "llama4": {
        "model_type": "llama4", "vocab_size": V, "num_hidden_layers": 4,
        "text_config": {
            "attention_bias": False, "attention_chunk_size": 8, "head_dim": 16, "hidden_size": 64,
            "interleave_moe_layer_step": 2, "intermediate_size": 64, "intermediate_size_mlp": 128,
            "max_position_embeddings": 512, "model_type": "llama4", "num_attention_heads": 4,
            "num_experts_per_tok": 1, "num_hidden_layers": 4, "num_key_value_heads": 2, "num_local_experts": 8,
            "rms_norm_eps": 0.0001, "rope_scaling": None, "rope_theta": 1000, "use_qk_norm": True, "vocab_size": V,
        },
    },
    "longcat_flash": _LONGCAT,
    "longcat_flash_ngram": {**_LONGCAT, "model_type": "longcat_flash_ngram"},
    "mellum": {
        "model_type": "mellum", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "rms_norm_eps": 1e-06, "vocab_size": V, "num_key_value_heads": 2, "head_dim": 16,
        "tie_word_embeddings": False, "max_position_embeddings": 512, "norm_topk_prob": True, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_theta": 10000.0}, "full_attention": {"rope_theta": 1e6}},
    },
    "mimo_v2_flash": {
        "model_type": "mimo_v2_flash", "num_experts_per_tok": 2, "hybrid_layer_pattern": [0, 1, 0],
        "moe_layer_freq": [0, 1, 1], "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
        "sliding_window_size": 8, "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": None, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 2, "topk_group": 1,
        "max_position_embeddings": 512, "layernorm_epsilon": 1e-05, "rope_theta": 1000.0,
        "swa_rope_theta": 1000.0, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "head_dim": 16,
        "v_head_dim": 16, "swa_head_dim": 16, "swa_v_head_dim": 16, "partial_rotary_factor": 0.5,
    },
    "minimax": {
        "model_type": "minimax", "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "num_experts_per_tok": 2, "num_local_experts": 8,
        "shared_intermediate_size": 64, "num_hidden_layers": 2, "rms_norm_eps": 0.0001, "rope_theta": 1000,
        "rotary_dim": 8, "vocab_size": V,
    },
    "minimax_m3_vl": {
        "model_type": "minimax_m3_vl",
        "text_config": {
            "model_type": "minimax_m3", "hidden_size": 64, "intermediate_size": 64, "dense_intermediate_size": 128,
            "shared_intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16,
            "max_position_embeddings": 512, "vocab_size": V,
        },
    },
    "mistral3": {"model_type": "mistral3", "text_config": _MISTRAL4},
    "mistral4": _MISTRAL4,
    "mixtral": {
        "model_type": "mixtral", "vocab_size": V, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2,
        "num_local_experts": 8,
    },
    "muse_spark": {
        "model_type": "muse_spark",
        "text_config": {
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_hidden_layers": 2, "vocab_size": V, "rms_norm_eps": 1e-6, "post_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0}, "layer_rope_theta": [10000.0, 0],
            "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
            "final_logit_softcapping": 30.0, "output_multiplier": 1.0, "num_local_experts": 8,
            "num_experts_per_tok": 2, "moe_hidden_size": 64, "moe_intermediate_size": 64,
        },
    },
    "nemotron_h": {
        "model_type": "nemotron_h", "vocab_size": V, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 4, "max_position_embeddings": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False,
        "ssm_state_size": 16, "conv_kernel": 3, "n_groups": 2, "time_step_limit": [1.0, 2.0], "mlp_bias": False,
        "layer_norm_epsilon": 0.0001, "rms_norm_eps": 1e-05, "use_bias": False, "use_conv_bias": True,
        "residual_in_fp32": True, "hybrid_override_pattern": ["M", "E", "*", "E"], "moe_intermediate_size": 64,
        "moe_shared_expert_intermediate_size": 64, "n_group": 1, "n_routed_experts": 8, "n_shared_experts": 1,
        "topk_group": 1, "num_experts_per_tok": 2, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
    },
    "olmoe": {
        "model_type": "olmoe", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 2, "rms_norm_eps": 1e-05, "vocab_size": V, "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    "phimoe": {
        "model_type": "phimoe", "vocab_size": V, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 8,
        "rope_scaling": {
            "long_factor": [1.0] * 8, "long_mscale": 1.243163121016122, "original_max_position_embeddings": 4096,
            "short_factor": [1.0] * 8, "short_mscale": 1.243163121016122, "type": "longrope",
        },
    },
    "phixtral": {
        "model_type": "phixtral", "num_vocab": V, "model_dim": 64, "num_heads": 4, "num_layers": 2,
        "rotary_dim": 8, "num_experts_per_tok": 2, "num_local_experts": 8,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "rms_norm_eps": 1e-05, "vocab_size": V, "num_experts_per_tok": 2,
        "num_experts": 8, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    },
    "qwen3_5": {"model_type": "qwen3_5", "text_config": {**_QWEN_NEXT, "model_type": "qwen3_5"}},
    "qwen3_5_moe": {"model_type": "qwen3_5_moe", "text_config": {**_QWEN_NEXT, "model_type": "qwen3_5_moe"}},
    "qwen3_moe": _QWEN3_MOE,
    "qwen3_next": {**_QWEN_NEXT, "model_type": "qwen3_next"},
    "qwen3_vl_moe": {"model_type": "qwen3_vl_moe", "text_config": _QWEN3_MOE},
    "solar_open": {
        "model_type": "solar_open", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 1.0,
        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": True, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-05, "rope_theta": 1000.0, "tie_word_embeddings": False, "partial_rotary_factor": 1.0,
    },
    "step3p5": {
        "model_type": "step3p5", "hidden_size": 64, "num_hidden_layers": 3, "vocab_size": V,
        "num_attention_heads": 4, "num_attention_groups": 2, "head_dim": 16, "intermediate_size": 128,
        "rms_norm_eps": 1e-05, "rope_theta": [10000.0, 10000.0, 10000.0], "sliding_window": 8,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        "partial_rotary_factors": [0.5, 1.0, 0.5],
        "attention_other_setting": {"num_attention_heads": 4, "num_attention_groups": 2},
        "use_head_wise_attn_gate": True, "moe_num_experts": 8, "moe_top_k": 2, "moe_intermediate_size": 64,
        "share_expert_dim": 64, "moe_layers_enum": "1,2",
    },
}  # fmt: skip

# Architectures with routed experts that flashmesh does not run, with the reason (shown in docs/store.md).
REFUSED: dict[str, str] = {
    "muse_spark": (
        "mlx-lm's own forward pass needs its Metal kernels (mlx_lm.kernels), which MLX on a CPU lacks, so it "
        "cannot be checked here; its expert module also holds a norm shared by all experts "
        "(experts.post_expert_norm), which `flashmesh pack` refuses"
    ),
}
# Architectures not checked here, with the reason.
NOT_CHECKED: dict[str, str] = {
    "prism_hadamard_qwen35": (
        "its checkpoints are calibrated, Hadamard-rotated 2-bit packs of qwen3_5 with a module manifest, "
        "which a random model built here cannot be"
    ),
}


def tiny_config(arch: str, *, vocab: int) -> dict:
    """The tiny config of `arch` with "<vocab>" replaced by `vocab`."""

    def fill(v):
        if v == V:
            return vocab
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        return v

    return fill(TINY_CONFIGS[arch])
