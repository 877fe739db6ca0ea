"""Generators p_theta(y | x, z), one import away: the interface and both back ends.

* :class:`Generator` (:mod:`ragline.models.generator`): prompts, scoring, prefill and cached decoding steps;
* :class:`CausalGenerator` (:mod:`ragline.models.causal`): decoder-only, the default (Qwen2.5, SmolLM2);
* :class:`Seq2SeqGenerator` (:mod:`ragline.models.seq2seq`): encoder-decoder, BART or T5 as in the paper;
* the prompts they build and the guard around user and corpus text: :mod:`ragline.models.prompts`;
* thorough decoding's scoring (memo, bound, planners, continuation tree): :mod:`ragline.models.thorough`.
"""

from ragline.models.causal import CausalGenerator
from ragline.models.generator import DecodeState, Generator, Scored
from ragline.models.prompts import Seq2SeqPrompt
from ragline.models.seq2seq import Seq2SeqGenerator

__all__ = ["CausalGenerator", "DecodeState", "Generator", "Scored", "Seq2SeqGenerator", "Seq2SeqPrompt"]
