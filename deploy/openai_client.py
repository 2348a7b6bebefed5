"""Ask the model served by vLLM's OpenAI-compatible server (started with --reasoning-parser qwen3).

    python deploy/openai_client.py "我最近总是头晕，还伴有耳鸣，这可能是什么原因？"
    OPENAI_BASE_URL=http://gpu-box:8000/v1 MODEL=qwen3-medical-v1 python deploy/openai_client.py "什么是高血压？"
"""
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
message = client.chat.completions.create(
    model=os.environ.get("MODEL", "qwen3-medical"),
    messages=[{"role": "system", "content": "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"},  # the training prompt
              {"role": "user", "content": sys.argv[1] if len(sys.argv) > 1 else "糖尿病人可以吃水果吗？"}],
    temperature=0.6, top_p=0.95, max_tokens=2048, extra_body={"top_k": 20},  # Qwen3's thinking-mode sampling
).choices[0].message
reasoning = getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None)  # vLLM < 0.11.2
print(f"==== 思考 / reasoning ====\n{reasoning or ''}\n==== 回答 / answer ====\n{message.content or ''}")
