"""Make the bitsandbytes-quantized test checkpoints of tests/data/ on the GPU machine (carried
bitsandbytes wheel; see ../shared/anchors/H100_PEERS.md), with bitsandbytes' own logits recorded at
the same time. tests/test_hf.py loads them with lowrank.from_pretrained (no bitsandbytes) and
compares the logits.

    python3 scripts/make_bnb_checkpoint.py OUT_DIR

The model is tests/test_hf.py's tiny Llama (seed 0, float32 weights); transformers quantizes it
on load with a BitsAndBytesConfig and saves it with save_pretrained, so every byte of the
checkpoint is written by transformers + bitsandbytes. Compute dtype float32 (TF32 off), so the
logits differ from lowrank's CPU float32 ones only by summation order."""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

out_root = sys.argv[1]
torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
float_dir = "/tmp/bnb_float"
model.save_pretrained(float_dir)
ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))

import bitsandbytes  # noqa: E402

versions = {"bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
print(versions)
for quant_type, double_quant in (("nf4", True), ("fp4", False)):
    name = f"bnb_tiny_llama_{quant_type}{'_dq' if double_quant else ''}"
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=torch.float32)
    qmodel = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=qcfg,
                                                               torch_dtype=torch.float32, device_map={"": 0})
    with torch.no_grad():
        logits = qmodel(ids.cuda()).logits.float().cpu()
    path = os.path.join(out_root, name)
    qmodel.save_pretrained(path)
    save_file({"input_ids": ids, "logits": logits.contiguous()}, os.path.join(path, "bnb_logits.safetensors"))
    with open(os.path.join(path, "made_by.json"), "w") as f:
        json.dump(dict(versions, quant_type=quant_type, double_quant=double_quant,
                       script="scripts/make_bnb_checkpoint.py"), f, indent=1)
    print(name, sorted(os.listdir(path)), float(logits.abs().max()))
