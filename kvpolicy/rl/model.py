"""A small Decision Transformer on a tiny Llama, fed ``inputs_embeds``.

Decision Transformer (Chen et al., "Decision Transformer: Reinforcement Learning via Sequence
Modeling", NeurIPS 2021): an episode is the token stream ``R_0, s_0, a_0, R_1, s_1, a_1, …``
(return-to-go, state, action); the action ``a_t`` is predicted from the hidden state at ``s_t``.
Here each kind of token has its own linear embedding plus a learned type vector, and the
sequence model is transformers' `LlamaModel` built from a small config — a family kvpolicy's
integration supports — so a policy attaches to ``model.backbone`` exactly as to a language model.
Positions come from RoPE over the absolute token index (three per timestep), which kvpolicy keeps
right after eviction.

Inference decodes one timestep per forward call: ``[a_{t-1}, R_t, s_t]`` (just ``[R_0, s_0]`` at
the start) goes through the backbone with the cache, and the head reads the last hidden state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvpolicy.atomic import atomic_path
from kvpolicy.checkpoint import read_tagged_metadata
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.integrations.hf.parts import llama_backbone

FORMAT = "kvpolicy.rl.decision_transformer/1"
TOKENS_PER_STEP = 3


@attrs.frozen
class DecisionTransformerConfig:
    """Shapes of the Decision Transformer (defaults: ~0.2 M parameters, ~1 MB in float32)."""

    state_dim: int = 19
    act_dim: int = 6
    hidden: int = 64  # width of every token
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention, as in the language models kvpolicy targets
    intermediate: int = 128  # MLP width
    max_timesteps: int = 1024  # RoPE positions cover 3 × this many tokens
    rtg_scale: float = 1000.0  # returns-to-go are divided by this before embedding

    def __attrs_post_init__(self) -> None:
        for name in ("state_dim", "act_dim", "hidden", "layers", "heads", "kv_heads", "intermediate", "max_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"DecisionTransformerConfig.{name} must be a whole number >= 1, got {value!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise InvalidConfigError(
                f"hidden ({self.hidden}) must divide by heads ({self.heads}) and heads by kv_heads ({self.kv_heads})"
            )
        if not self.rtg_scale > 0:
            raise InvalidConfigError(f"rtg_scale must be > 0, got {self.rtg_scale}")

    def llama_config(self) -> dict[str, Any]:
        """The `LlamaConfig` fields of the backbone (`kvpolicy.integrations.hf.parts.llama_backbone`)."""
        return dict(
            vocab_size=1,  # tokens are embedded by the Decision Transformer, never looked up
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=TOKENS_PER_STEP * self.max_timesteps,
            rope_theta=10000.0,
            attn_implementation="sdpa",
            bos_token_id=None,
            eos_token_id=None,
        )


class DecisionTransformer(nn.Module):
    """Return-to-go, state and action embeddings → `LlamaModel` → tanh action head.

    ``metadata`` carries what travels with the weights: the task config, the state normalisation,
    the target return to condition on and the random / expert returns that define normalised
    scores (random = 0, expert = 100).
    """

    def __init__(self, config: DecisionTransformerConfig, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.metadata = dict(metadata or {})
        h = config.hidden
        self.embed_rtg = nn.Linear(1, h)
        self.embed_state = nn.Linear(config.state_dim, h)
        self.embed_action = nn.Linear(config.act_dim, h)
        self.token_type = nn.Parameter(torch.zeros(TOKENS_PER_STEP, h))
        nn.init.normal_(self.token_type, std=0.02)
        self.backbone = llama_backbone(**config.llama_config())
        self.head = nn.Linear(h, config.act_dim)
        self.register_buffer("state_mean", torch.zeros(config.state_dim))
        self.register_buffer("state_std", torch.ones(config.state_dim))

    # ----------------------------------------------------------------- embeddings

    def _rtg(self, rtg: torch.Tensor) -> torch.Tensor:
        return self.embed_rtg(rtg.unsqueeze(-1) / self.config.rtg_scale) + self.token_type[0]

    def _state(self, states: torch.Tensor) -> torch.Tensor:
        return self.embed_state((states - self.state_mean) / self.state_std) + self.token_type[1]

    def _action(self, actions: torch.Tensor) -> torch.Tensor:
        return self.embed_action(actions) + self.token_type[2]

    def embed_episode(self, rtg: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``rtg [batch, steps]``, ``states [batch, steps, state_dim]``, ``actions [batch, steps, act_dim]``
        → interleaved ``[batch, 3·steps, hidden]`` (R_0, s_0, a_0, R_1, …)."""
        batch, steps = rtg.shape
        if states.shape[:2] != (batch, steps) or actions.shape[:2] != (batch, steps):
            raise ShapeError(
                f"rtg {tuple(rtg.shape)}, states {tuple(states.shape)} and actions {tuple(actions.shape)} "
                "must share [batch, steps]"
            )
        tokens = torch.stack([self._rtg(rtg), self._state(states), self._action(actions)], dim=2)
        return tokens.reshape(batch, TOKENS_PER_STEP * steps, self.config.hidden)

    def embed_step(self, previous_action: torch.Tensor | None, rtg: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One timestep's new tokens ``[batch, 2 or 3, hidden]``: ``[a_{t-1}, R_t, s_t]``, or ``[R_0, s_0]``."""
        parts = [self._rtg(rtg).unsqueeze(1), self._state(state).unsqueeze(1)]
        if previous_action is not None:
            parts.insert(0, self._action(previous_action).unsqueeze(1))
        return torch.cat(parts, dim=1)

    def act(self, hidden: torch.Tensor) -> torch.Tensor:
        """Actions in [-1, 1] from hidden states at state tokens."""
        return torch.tanh(self.head(hidden))

    def forward(
        self, rtg: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced predictions ``[batch, steps, act_dim]`` of every action from its state token.

        ``timesteps [batch, steps]`` (increasing along ``steps``): the episode steps the inputs come
        from, for sequences cut out of an episode; token positions are then ``3·t + 0, 1, 2``, the
        positions those tokens have in a rollout. None: steps ``0 .. steps-1``.
        """
        position_ids = attention_mask = None
        if timesteps is not None:
            if timesteps.shape != rtg.shape:
                raise ShapeError(f"timesteps {tuple(timesteps.shape)} must match rtg {tuple(rtg.shape)}")
            offsets = torch.arange(TOKENS_PER_STEP, device=timesteps.device)
            position_ids = (TOKENS_PER_STEP * timesteps.unsqueeze(-1) + offsets).reshape(timesteps.shape[0], -1)
            # without a mask, transformers reads a jump in position_ids as the start of another
            # packed sequence and hides everything before it; the cut sequence is one sequence
            attention_mask = torch.ones_like(position_ids)
        hidden = self.backbone(
            inputs_embeds=self.embed_episode(rtg, states, actions),
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state
        return self.act(hidden[:, 1::TOKENS_PER_STEP])

    # ----------------------------------------------------------------- save / load

    def set_state_normalisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.state_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.state_std.copy_(torch.as_tensor(np.maximum(std, 1e-2), dtype=torch.float32))

    def save(self, path: str | Path) -> None:
        """Weights and metadata as one safetensors file, written atomically."""
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "format": FORMAT,
            "config": json.dumps(attrs.asdict(self.config)),
            "metadata": json.dumps(self.metadata),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> DecisionTransformer:
        """A model saved by `save`; raises `CheckpointError` for a missing or foreign file."""
        path = Path(path)
        meta = read_tagged_metadata(path, FORMAT, "Decision Transformer")
        model = cls(DecisionTransformerConfig(**json.loads(meta["config"])), json.loads(meta["metadata"]))
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
