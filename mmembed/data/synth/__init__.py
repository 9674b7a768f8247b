"""The synthetic world: procedurally generated scenes and documents written in the real data formats.

``generate(out, seed, size)`` writes training shards, MMEB-style and VisDoc (BEIR) eval sets, LLaVA-style stage-1
data and a manifest; see :mod:`mmembed.data.synth.world` for the layout and :mod:`mmembed.data.synth.tasks` for
the datasets.
"""

from mmembed.data.synth.tasks import BY_NAME, DATASETS, SynthDataset
from mmembed.data.synth.world import SIZES, SizeConfig, generate

__all__ = ["BY_NAME", "DATASETS", "SIZES", "SizeConfig", "SynthDataset", "generate"]
