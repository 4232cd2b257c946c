"""ChatMoERouter in an LCEL chain, then streaming, with the routing trace.

Start a router first (``moe serve --config configs/demo.yaml``), then::

    python examples/langchain_router.py --base-url http://127.0.0.1:8000 [--api-key KEY]

The key may also come from ``MOE_API_KEY``; it is needed only when the service has ``security.api_keys``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import SecretStr

from router.langchain import ChatMoERouter


async def main(base_url: str, api_key: str | None) -> None:
    key = SecretStr(api_key) if api_key else None
    model = ChatMoERouter(base_url=base_url, api_key=key, model="auto", temperature=0.0, max_tokens=256)

    # 1. One call: the answer, the expert that gave it and why the gate chose it.
    message = await model.ainvoke("Write a function to sort the given list.")
    trace = message.response_metadata["moe_trace"]
    print(f"[{message.response_metadata['model_name']}] {message.content}")
    if trace["decision"]:
        print("  gate scores:", {k: round(v, 3) for k, v in trace["decision"]["scores"].items()})
    print(f"  attempts: {[(a['expert'], a['ok']) for a in trace['attempts']]}  cost: ${trace['cost_usd']:.6f}")

    # 2. In an LCEL chain.
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in one sentence."), ("human", "{question}")])
    chain = prompt | model | StrOutputParser()
    print("\nchain:", await chain.ainvoke({"question": "Write a function to convert a list to a tuple."}))

    # 3. Streaming: tokens as they come; the last chunk carries the trace.
    print("\nstream: ", end="", flush=True)
    final = None
    async for chunk in model.astream("Write a function to find the nth nonagonal number."):
        print(chunk.content, end="", flush=True)
        final = chunk if final is None else final + chunk
    if final is not None:
        print(f"\n  answered by {final.response_metadata.get('model_name')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("MOE_API_KEY"))
    args = parser.parse_args()
    asyncio.run(main(args.base_url, args.api_key))
