"""Plain ``ChatOpenAI`` pointed at the router: no router-specific code at all.

Start a router first (``moe serve --config configs/demo.yaml``), then::

    python examples/langchain_chatopenai.py --base-url http://127.0.0.1:8000 [--api-key KEY]

``model="auto"`` lets the gate choose; an expert's name calls that expert. The answering expert comes back
as the response's model name; the full trace is in the raw response's ``moe`` field (see
``langchain_router.py`` for a class that surfaces it).
"""

from __future__ import annotations

import argparse
import os

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import SecretStr


def main(base_url: str, api_key: str) -> None:
    model = ChatOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=SecretStr(api_key), model="auto", temperature=0.0,
                       max_completion_tokens=256)

    message = model.invoke("Write a function to sort the given list.")
    print(f"[{message.response_metadata.get('model_name')}] {message.content}")

    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model | StrOutputParser()
    print("chain:", chain.invoke({"question": "Write a function to convert a list to a tuple."}))

    print("stream: ", end="", flush=True)
    for piece in chain.stream({"question": "Write a function to find the nth nonagonal number."}):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    # ChatOpenAI needs some key; an open router ignores it.
    parser.add_argument("--api-key", default=os.environ.get("MOE_API_KEY", "unused"))
    args = parser.parse_args()
    main(args.base_url, args.api_key)
