"""Call qwenserve's OpenAI-compatible HTTP API with the `openai` package: a chat reply, a streamed
completion, structured output (a JSON schema, a choice), and a tool call whose result goes back
to the model.

    pip install openai          # not a qwenserve dependency
    qwenserve launch            # in another shell (with the venv activated)
    python examples/http_client.py [--base-url http://127.0.0.1:8000] [--max-tokens 32]

Set QWENSERVE_API_KEY when the server was started with an API key. With the built-in tiny
model (random weights) the text is gibberish; serve a real checkpoint (e.g.
`qwenserve launch --model Qwen/Qwen-7B-Chat`) for real answers.
"""
import argparse
import json
import os

from openai import OpenAI

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# Every value is bounded, so even a random-weight model finishes it in a few tokens.
WEATHER_SCHEMA = {"type": "object", "properties": {
    "sky": {"enum": ["clear", "overcast", "rain", "snow"]},
    "temperature_c": {"type": "integer", "minimum": -60, "maximum": 60}}, "required": ["sky", "temperature_c"]}


def get_weather(city: str = "Reykjavik") -> dict:
    return {"city": city, "temperature_c": 4, "sky": "overcast"}  # a stand-in for a real service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url + "/v1", api_key=os.environ.get("QWENSERVE_API_KEY", "none"))
    model = client.models.list().data[0].id
    print(f"model: {model}")

    print("\n--- chat")
    reply = client.chat.completions.create(
        model=model, max_tokens=args.max_tokens,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "冰岛的首都是哪里？"}])
    print(reply.choices[0].message.content, f"[{reply.choices[0].finish_reason}, {reply.usage.total_tokens} tokens]")

    print("\n--- streamed completion")
    for chunk in client.completions.create(model=model, prompt="The capital of Iceland is", stream=True,
                                           max_tokens=args.max_tokens, temperature=0):
        print(chunk.choices[0].text, end="", flush=True)
    print()

    print("\n--- structured output: a JSON schema, then one of a list of strings")
    reply = client.chat.completions.create(
        model=model, max_tokens=4 * args.max_tokens, temperature=0,
        messages=[{"role": "user", "content": "The weather in Reykjavik, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}})
    choice = reply.choices[0]
    # "stop": a complete, valid object; "length": max_tokens cut it short.
    print(choice.message.content, f"[{choice.finish_reason}]")
    if choice.finish_reason == "stop":
        print("parsed:", json.loads(choice.message.content))
    reply = client.completions.create(model=model, prompt="Is Reykjavik a capital?", max_tokens=args.max_tokens,
                                      extra_body={"guided_choice": ["yes", "no"]})  # vLLM's extra field
    print(reply.choices[0].text, f"[{reply.choices[0].finish_reason}]")

    print("\n--- a tool call and its result")
    messages = [{"role": "user", "content": "What is the weather in Reykjavik?"}]
    # tool_choice names the tool ("required" would let the model pick one of the tools), so that
    # even a model that would answer directly calls it, with arguments that the sampler holds to
    # the tool's parameters schema.
    reply = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], max_tokens=args.max_tokens,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    print(f"the model calls {call.function.name}({call.function.arguments})")
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:  # cut off by max_tokens before the JSON was whole
        arguments = {}
    city = arguments.get("city") if isinstance(arguments, dict) else None
    result = get_weather(city) if isinstance(city, str) else get_weather()
    messages += [reply.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                           max_tokens=args.max_tokens)
    print("the model answers:", final.choices[0].message.content)


if __name__ == "__main__":
    main()
