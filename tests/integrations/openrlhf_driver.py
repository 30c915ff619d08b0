"""Run inside the OpenRLHF venv: OpenRLHF's own executor fetches rewards from our server.

Usage: ``<openrlhf-venv>/bin/python openrlhf_driver.py spec.json``; prints one JSON object.

The spec names the tokenizer folder, the reward URLs (HTTP replicas) and the reward file,
and the cases (prompt, response, label). For each way of reaching the server, an
``openrlhf.utils.agent.SingleTurnAgentExecutor`` from the installed package runs
``execute`` on every case: it tokenises the prompt, asks the "engine" for a continuation,
decodes prompt + response into the query and fetches the reward the way it does in
training. The engine is a stand-in for vLLM (OpenRLHF's generator, not its reward path)
that answers with the case's response tokens. Both executors then score all cases in one
call of the executor's batch method, which shards the batch across the URLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ScriptedEngine:
    """vLLM's ``generate`` shape: returns the scripted response for the prompt's tokens."""

    def __init__(self, tokenizer, script: dict[tuple[int, ...], str]) -> None:
        self.tokenizer = tokenizer
        self.script = script

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        text = self.script[tuple(prompt_token_ids)]
        ids = self.tokenizer(text=text, add_special_tokens=False)["input_ids"]
        out = SimpleNamespace(
            token_ids=ids, text=self.tokenizer.decode(ids), finish_reason="stop", logprobs=None
        )
        return SimpleNamespace(outputs=[out])


async def run(spec: dict) -> dict:
    import openrlhf
    from openrlhf.utils.agent import SingleTurnAgentExecutor
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    cases = spec["cases"]
    script = {
        tuple(tok(text=c["prompt"], add_special_tokens=False)["input_ids"]): c["response"]
        for c in cases
    }
    engine = ScriptedEngine(tok, script)
    params = SimpleNamespace(max_tokens=256, logprobs=None)
    out: dict = {"openrlhf": getattr(openrlhf, "__version__", None), "ways": {}}
    for way, target in (("http", spec["urls"]), ("reward_func", spec["reward_file"])):
        executor = SingleTurnAgentExecutor(target)
        per_case = []
        for c in cases:
            r = await executor.execute(c["prompt"], c["label"], params, 1024, tok, engine)
            per_case.append({k: r[k] for k in ("reward", "scores", "extra_logs")})
        # The executor's batch path: one call, sharded across the URLs for HTTP.
        queries = [c["prompt"] + c["response"] for c in cases]
        prompts = [c["prompt"] for c in cases]
        labels = [c["label"] for c in cases]
        if way == "http":
            shards = await executor._fetch_rewards_via_http(queries, prompts, labels)
        else:
            shards = [executor.reward_func(queries, prompts, labels)]
        batch = [x for shard in shards for x in shard["rewards"]]
        out["ways"][way] = {"per_case": per_case, "batch": batch, "shards": len(shards)}
    return out


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    print(json.dumps(asyncio.run(run(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
