"""Load a checkpoint with stock transformers only (no platform code) and print one JSON line:
the version, the loading info, the chat-template prompt ids and 8 greedy tokens for one image.

Run by tests/modeling/test_hf_layout.py under the pinned transformers 5.x and under 4.57.
"""

import json
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder = sys.argv[1]
model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.new("RGB", (60, 40), (200, 30, 30))  # not square: the processor pads it
inputs = processor(images=image, text=prompt, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(json.dumps({
    "version": transformers.__version__,
    "loading": {k: len(v) for k, v in info.items()},
    "prompt_ids": inputs["input_ids"][0].tolist(),
    "tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
}))
