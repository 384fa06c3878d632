"""LoPT inside the Hugging Face Trainer: ``lopt.apply`` on a causal LM, chat SFT with the prompt masked, a plain save.

    python examples/apply_hf_trainer.py                       # the embedded 4-layer toy, offline, on the CPU
    python examples/apply_hf_trainer.py --model ./Qwen2.5-0.5B-Instruct --lr 2e-5 --max-steps 200

Prints the held-out loss before and after training; ``--output-dir`` gets a plain Hugging Face checkpoint.
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

import lopt
from lopt.data.sft import collate, rows_to_conversations, tokenize_conversations
from lopt.data.embedded import record_splits, sft_splits
from lopt.models.loading import load_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="tiny",
                    help="'tiny' (the embedded toy), a Hugging Face checkpoint directory, a .gguf file or a hub id")
parser.add_argument("--output-dir", default="out-apply-hf-trainer")
parser.add_argument("--max-steps", type=int, default=10)
parser.add_argument("--lr", type=float, default=1e-3, help="1e-3 suits the random-init toy; ~2e-5 a pretrained model")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--seq-len", type=int, default=128)
args = parser.parse_args()

# 1. The model and its tokenizer. Load it on the device it will train on *before* lopt.apply: apply turns the
#    fused Triton kernels on only for a model already on a CUDA GPU.
device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer, source = load_model(args.model, device=device)

# 2. Chat SFT data, the rows `lopt train` uses by default: the toy's seven small tasks, or the record task for a
#    real model. Each row becomes [user, assistant] messages, rendered with the tokenizer's chat template;
#    tokenize_conversations keeps labels on the assistant turns only and puts -100 on every prompt token.
train_rows, held_out_rows = sft_splits(512, 32) if source.kind == "tiny" else record_splits(512, 32)
train = tokenize_conversations(rows_to_conversations(train_rows)[0], tokenizer, args.seq_len)
held_out = tokenize_conversations(rows_to_conversations(held_out_rows)[0], tokenizer, args.seq_len)

# 3. The collator: right-pad each micro-batch to its longest row; padding gets attention_mask 0 and label -100.
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collator(examples):
    return collate(examples, pad_id)


def held_out_loss():
    """Mean cross-entropy over the held-out answers' tokens: eval mode and no_grad run the model's own forward."""
    model.eval()
    with torch.no_grad():
        batch = {k: v.to(model.device) for k, v in collator(held_out).items()}
        loss = model(**batch).loss.item()
    model.train()
    return loss


before = held_out_loss()

# 4. LoPT, in place: two blocks, each lower block learning from its own reconstruction loss during the forward.
#    The returned engine holds the decoders and param_groups(); the Trainer needs nothing from it here.
engine = lopt.apply(model, num_blocks=2)

# 5. The ordinary Trainer. LoPTCallback logs aux_loss, reads gradient_accumulation_steps and keeps the decoders
#    in checkpoints. A list of Examples is a fine train_dataset: the collator turns them into tensors.
training_args = TrainingArguments(
    output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
    report_to="none", use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0,
)
trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                  callbacks=[lopt.LoPTCallback(model)])
trainer.train()

# 6. Save: the decoders are in the model's _keys_to_ignore_on_save, so this writes a plain checkpoint that
#    AutoModelForCausalLM.from_pretrained loads. (lopt.remove(model) would restore the model's own forward.)
#    apply unties tied embeddings (the head trains in the upper block, the embeddings in the lowest), so a tied
#    model is saved with tie_word_embeddings=False and its own lm_head.
trainer.save_model(args.output_dir)
tokenizer.save_pretrained(args.output_dir)

logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
print(f"train loss: first step {logged[0]:.4f}, last step {logged[-1]:.4f}")
print(f"held-out loss: before {before:.4f}, after {held_out_loss():.4f}")
print(f"saved to {args.output_dir}")
