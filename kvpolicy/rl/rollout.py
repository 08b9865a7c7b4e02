"""Rolling a Decision Transformer out in the cue task, one timestep per forward call.

Each step feeds ``[a_{t-1}, R_t, s_t]`` as ``inputs_embeds`` to the backbone over the cache and
acts from the last hidden state; the return-to-go starts at the model's target return and falls
by every reward received. With a kvpolicy policy the backbone runs attached (`Handle.feed_embeds`,
eviction between steps); without one it runs on a plain `DynamicCache` — the bare model, which a
keep-all policy must match bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from kvpolicy.errors import InvalidConfigError
from kvpolicy.integrations.hf.attach import cache_keyword
from kvpolicy.integrations.hf.cache import EvictingCache, EvictingLayer
from kvpolicy.integrations.hf.parts import bare_cache
from kvpolicy.rl.envs import CueTaskConfig, make_env
from kvpolicy.rl.model import TOKENS_PER_STEP, DecisionTransformer


@attrs.frozen(eq=False)
class RolloutResult:
    """One episode: its return, the final phase's return, the actions taken, and the cache kept.

    ``kept_fraction`` is the time-averaged memory: Σ_t kept_t ÷ Σ_t seen_t, with kept_t the
    tokens cached after step t (mean over layers and KV heads) and seen_t the tokens fed so far —
    the share of a full cache's memory the rollout used. ``final_kept_fraction`` is the same
    ratio at the last step; ``tokens_seen`` the length of the whole token stream.

    ``cue_kept`` is read from the evicting cache as the first final-phase action is taken (just
    before that step's forward call, i.e. what its queries attend to): the share of the cue
    steps' tokens (``R_t, s_t, a_t`` for every step the cue shows) still held, mean over the
    evicting layers and their KV heads; ``cue_kept_per_layer`` the same per evicting layer.
    None for the bare model (no evicting cache) or an episode cut before the final phase.
    """

    episode_return: float
    final_return: float
    cue: int
    actions: np.ndarray
    kept_fraction: float
    final_kept_fraction: float
    tokens_seen: int
    cue_kept: float | None = None
    cue_kept_per_layer: tuple[float, ...] | None = None


def task_config(model: DecisionTransformer) -> CueTaskConfig:
    """The task the model was trained on (from its metadata)."""
    return CueTaskConfig(**model.metadata["task"])


def cue_positions(task: CueTaskConfig) -> tuple[int, int]:
    """Absolute token positions ``start, stop`` of the cue steps' tokens: step t's ``R_t, s_t, a_t``
    sit at ``3t, 3t+1, 3t+2`` (step 0 has no previous action, so ``a_{t-1}`` fed with step t is at
    ``3t-1``)."""
    return TOKENS_PER_STEP * task.cue_start, TOKENS_PER_STEP * (task.cue_start + task.cue_steps)


def cue_kept_per_layer(cache: EvictingCache, task: CueTaskConfig) -> np.ndarray:
    """``[batch, evicting layers]``: per episode and evicting layer, the share of the cue steps'
    tokens its KV heads still hold (mean over heads), read with `EvictingLayer.held_share`."""
    start, stop = cue_positions(task)
    shares = [layer.held_share(start, stop).mean(-1) for layer in cache.layers if isinstance(layer, EvictingLayer)]
    return torch.stack(shares, 1).numpy() if shares else np.zeros((0, 0))


def _kept(cache: EvictingCache) -> np.ndarray:
    """``[batch]`` tokens kept per episode, mean over evicting layers and KV heads."""
    counts = [layer.kept_per_head().mean(-1) for layer in cache.layers if isinstance(layer, EvictingLayer)]
    return torch.stack(counts).double().mean(0).numpy() if counts else np.zeros(0)


def rollout(model: DecisionTransformer, *, seed: int, cue: int, **options: Any) -> RolloutResult:
    """Play one episode of the cue task (env seed ``seed``, cue ``cue``) with ``model``: `rollouts`
    with a batch of one (its ``options``)."""
    return rollouts(model, seeds=[seed], cues=[cue], **options)[0]


def rollouts(
    model: DecisionTransformer,
    *,
    seeds: Sequence[int],
    cues: Sequence[int],
    policy: Any | None = None,
    target_return: float | None = None,
    task: CueTaskConfig | None = None,
    steps: int | None = None,
    hide_cue: bool = False,
) -> list[RolloutResult]:
    """Play one episode per ``seeds[i]`` (cue ``cues[i]``) with ``model``, the episodes as the
    rows of one batch: one forward call per timestep for all of them, each row evicted on its
    own (the cache keeps rows apart), so an episode does not depend on the others beyond the
    last bits of batched arithmetic.

    ``policy``: a `kvpolicy.Policy` managing the backbone's cache, or None for the bare model.
    ``target_return`` defaults to the model's metadata (the expert data's mean return);
    ``steps`` cuts the episodes short (tests). ``hide_cue``: the model is shown 0 where the
    observation holds the cue, as at every other step; the environment still rewards by the
    cue, so this measures what the model owes to the cue (evicting the cue's tokens instead
    also removes the cue's steps from the model's view, which is not the same).
    """
    if len(seeds) != len(cues) or not seeds:
        raise InvalidConfigError(f"rollouts needs one cue per seed, at least one: {len(seeds)} seeds, {len(cues)} cues")
    task = task or task_config(model)
    target = float(model.metadata["target_return"] if target_return is None else target_return)
    envs = [make_env(task) for _ in seeds]
    observations = [
        env.reset(seed=seed, options={"cue": cue})[0] for env, seed, cue in zip(envs, seeds, cues, strict=True)
    ]
    batch = len(envs)
    horizon = task.horizon if steps is None else min(steps, task.horizon)
    model.eval()
    actions: list[list[np.ndarray]] = [[] for _ in envs]
    rewards: list[list[float]] = [[] for _ in envs]
    running = [True] * batch  # a terminated episode stops recording; its row still runs, unread
    kept_sum, seen_sum = np.zeros(batch), np.zeros(batch)
    last_kept = np.ones(batch)
    rtg = [target] * batch
    previous: torch.Tensor | None = None
    keyword = cache_keyword(model.backbone)
    cue_layers: np.ndarray | None = None

    def run(step_forward, read_cue=None) -> None:
        nonlocal previous, last_kept, cue_layers
        for t in range(horizon):
            if t == task.final_start and read_cue is not None:
                cue_layers = read_cue()
            state = torch.as_tensor(np.stack(observations), dtype=torch.float32)
            if hide_cue:
                state[:, task.cue_index] = 0.0
            with torch.no_grad():
                embeds = model.embed_step(previous, torch.tensor(rtg, dtype=torch.float32), state)
                hidden, kept, seen = step_forward(embeds)
                action = model.act(hidden[:, -1])
            for row, env in enumerate(envs):
                if not running[row]:
                    continue
                obs, reward, terminated, truncated, _ = env.step(action[row].double().numpy())
                observations[row] = obs
                actions[row].append(action[row].numpy().copy())
                rewards[row].append(float(reward))
                rtg[row] -= float(reward)
                kept_sum[row] += kept[row]
                seen_sum[row] += seen
                last_kept[row] = kept[row] / seen
                running[row] = not (terminated or truncated)
            previous = action
            if not any(running):
                break

    if policy is None:
        cache = bare_cache(model.backbone)

        def bare(embeds: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, int]:
            out = model.backbone(inputs_embeds=embeds, use_cache=True, **{keyword: cache})
            length = cache.get_seq_length()
            return out.last_hidden_state, np.full(batch, float(length)), length

        run(bare)
    else:
        with policy.attach(model.backbone) as handle:
            handle.reset()

            def attached(embeds: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, int]:
                hidden = handle.feed_embeds(embeds)
                return hidden, _kept(handle.cache), handle.cache.seen

            run(attached, lambda: cue_kept_per_layer(handle.cache, task))
    for env in envs:
        env.close()
    results = []
    for row in range(batch):
        layers = None if cue_layers is None or cue_layers.shape[1] == 0 else tuple(float(x) for x in cue_layers[row])
        results.append(
            RolloutResult(
                episode_return=float(sum(rewards[row])),
                final_return=float(sum(rewards[row][task.final_start :])),
                cue=int(cues[row]),
                actions=np.asarray(actions[row]),
                kept_fraction=float(kept_sum[row] / seen_sum[row]) if seen_sum[row] else 1.0,
                final_kept_fraction=float(last_kept[row]),
                tokens_seen=int(seen_sum[row] and 3 * len(actions[row]) - 1),
                cue_kept=float(np.mean(layers)) if layers else None,
                cue_kept_per_layer=layers,
            )
        )
    return results
