"""Cut training sequences: which steps they hold, and that their tokens sit where a rollout puts them."""

from __future__ import annotations

import pytest

pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'kvpolicy[rl]'")
pytest.importorskip("mujoco", reason="needs the rl extra: pip install 'kvpolicy[rl]'")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvpolicy.integrations.hf.attach import cache_keyword  # noqa: E402
from kvpolicy.rl.control_eval import ControlVariant  # noqa: E402
from kvpolicy.rl.model import TOKENS_PER_STEP, DecisionTransformer, DecisionTransformerConfig  # noqa: E402
from kvpolicy.rl.train import TrainConfig, sample_timesteps  # noqa: E402


def test_cut_sequences_hold_the_prefix_and_one_window():
    config = TrainConfig(batch=64, window=10, prefix=4, onset_fraction=0.5, full_every=3)
    generator = torch.Generator().manual_seed(0)
    assert sample_timesteps(config, 2, 100, 80, generator) is None  # every third update: whole episodes
    cut = sample_timesteps(config, 0, 100, 80, generator)
    assert cut.shape == (64, 14)
    assert (cut[:, :4] == torch.arange(4)).all()
    window = cut[:, 4:]
    assert (window.diff(dim=1) == 1).all() and (window[:, 0] >= 4).all() and (window[:, -1] <= 99).all()
    at_onset = ((window[:, 0] <= 80) & (window[:, -1] >= 80)).float().mean()
    assert 0.35 < at_onset < 0.85  # half on purpose, a few more by chance


def test_cut_sequence_sees_what_a_rollout_that_evicted_the_gap_sees():
    torch.manual_seed(0)
    model = DecisionTransformer(
        DecisionTransformerConfig(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, max_timesteps=16)
    ).eval()
    rtg, states, actions = torch.randn(1, 12), torch.randn(1, 12, 19), torch.rand(1, 12, 6) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(rtg, states, actions), model(rtg, states, actions, torch.arange(12)[None]))
        steps = torch.tensor([0, 1, 6, 7, 8, 9])
        cut = model(rtg[:, steps], states[:, steps], actions[:, steps], steps[None])
        # the same tokens decoded in two chunks over a cache, at their rollout positions
        cache, hidden = DynamicCache(), []
        for chunk in (steps[:2], steps[2:]):
            embeds = model.embed_episode(rtg[:, chunk], states[:, chunk], actions[:, chunk])
            positions = (TOKENS_PER_STEP * chunk[:, None] + torch.arange(TOKENS_PER_STEP)).reshape(1, -1)
            out = model.backbone(
                inputs_embeds=embeds, position_ids=positions, use_cache=True, **{cache_keyword(model.backbone): cache}
            )
            hidden.append(out.last_hidden_state[:, 1::TOKENS_PER_STEP])
        decoded = model.act(torch.cat(hidden, dim=1))
        unshifted = model(rtg[:, steps], states[:, steps], actions[:, steps])  # positions 0..17: not a rollout's
    torch.testing.assert_close(cut, decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cut[:, :2], unshifted[:, :2])  # the prefix sits at the same positions either way
    assert (cut[:, 2:] - unshifted[:, 2:]).abs().max() > 1e-6  # the window does not


@pytest.mark.parametrize("text", ["full", "full:hide-cue", "h2o@128", "namm-bam-smollm2@25%:hide-cue"])
def test_policy_spec_labels_parse_back(text):
    assert ControlVariant.parse(text).label == text
    assert ControlVariant.parse("full:hide-cue") == ControlVariant("full", None, hide_cue=True)
