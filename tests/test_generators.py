"""Generator back ends: the bundled SmolLM2 (dequantised once per user) and batching invariances."""

import pytest
import torch

from ragline.corpus.passages import Passage
from ragline.models.generators import CausalGenerator

PARIS = Passage("Paris#0", "Paris", "Paris", "Paris is the capital and largest city of France.")
ROME = Passage("Rome#0", "Rome", "Rome", "Rome is the capital city of Italy.")


@pytest.fixture(scope="module")
def smol():
    return CausalGenerator.load("smollm2")


def test_bundled_generator_is_cached_as_a_plain_hf_folder(smol):
    from ragline import paths

    folder = paths.models_dir() / "smollm2"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert smol.end_id == smol.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_batched_left_padded_scores_equal_one_by_one(smol):
    questions = ["What is the capital of France?", "Which city is the capital of Italy, a country in Europe?"]
    passages = [[PARIS, ROME, None], [ROME, PARIS, None]]
    answers = ["Paris", "Rome, the Eternal City"]
    with torch.no_grad():
        batch = smol.score(questions, passages, answers)
    assert batch.logprobs.shape[:3] == (2, 3, batch.target.shape[1]) and batch.logprobs.shape[3] == smol.vocab_size
    assert batch.mask.sum(1).tolist() == [len(x) for x in smol.target_ids(answers)]
    for b in range(2):
        n = int(batch.mask[b].sum())
        for k in range(3):
            prompt = smol.tokenizer(smol.prompt(questions[b], passages[b][k]), add_special_tokens=False,
                                    return_tensors="pt")["input_ids"]
            ids = torch.cat([prompt, batch.target[b : b + 1, :n]], 1)
            with torch.no_grad():
                lp = torch.log_softmax(smol.model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1], -1)
            torch.testing.assert_close(batch.logprobs[b, k, :n], lp, atol=2e-4, rtol=1e-4)


def test_the_right_passage_makes_the_answer_likelier(smol):
    from ragline.rag.marginal import gather_targets

    with torch.no_grad():
        s = smol.score(["What is the capital of France?"], [[PARIS, ROME]], ["Paris"])
    seq = gather_targets(s.logprobs, s.target, s.mask.float()).sum(-1)[0]  # (K,)
    assert seq[0] > seq[1]
