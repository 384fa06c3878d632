"""Self-replay: general chat prompts, answered by the model as loaded, mixed into the training data.

A model fine-tuned on one narrow task drifts to answering everything in that task's form (the real
default's record task taught SmolLM2 to answer "What is the capital of France?" with ``name=SmolLM``).
Replaying the model's own answers to general prompts beside the task keeps them, with no data to ship
or download: before training, the model answers ``REPLAY_PROMPTS`` greedily through the chat template;
each answer that ends (an end-of-sequence token within ``REPLAY_ANSWER_TOKENS``) becomes a training
conversation, repeated so that it makes ``--replay`` of the training examples.

``REPLAY_PROMPTS`` shares no prompt with ``lopt.measures.retention.GENERAL_PROMPTS``: the retention measures stay
held out.
"""

from __future__ import annotations

import torch

from lopt.measures.evaluation import chat_prompt_ids, eos_ids, greedy_answers

REPLAY_ANSWER_TOKENS = 96

# Topics and question forms of their own: none is a paraphrase of a retention prompt (no "capital of",
# "synonym for", "translate ... into", "a fun fact about", "name for a pet", ...).
REPLAY_PROMPTS = (
    "Which river flows through Egypt?",
    "List three primary colors.",
    "What do cows eat?",
    "How do clouds form?",
    "Is a tomato a fruit or a vegetable?",
    "What animal is known as the king of the jungle?",
    "Give me a word that rhymes with cat.",
    "What causes thunder?",
    "Which instrument has 88 keys?",
    "What does a thermometer measure?",
    "Suggest a title for a short story about a lighthouse.",
    "What is the closest star to Earth?",
    "What is a good way to remember a shopping list?",
    "Why do cats purr?",
    "What can I cook with rice and beans?",
    "Use the word 'bright' in a sentence.",
    "What is gravity?",
    "Why do we have seasons?",
    "Spell the word 'necessary'.",
    "What is yeast used for?",
    "Why do zebras have stripes?",
    "Which continent is Kenya in?",
    "Why is the sky blue?",
    "Write a polite way to decline an invitation.",
    "Which ocean lies between Europe and America?",
    "What time of day is dawn?",
    "What do plants need to grow?",
    "Which instrument is played with a bow?",
    "What is the chemical symbol for gold?",
    "How do birds fly?",
    "What is a sandwich?",
    "What is 12 plus 7?",
    "Who was Albert Einstein?",
    "Why do people wear seatbelts?",
    "How does a bicycle work?",
    "What is a volcano?",
    "What is the plural of mouse?",
    "What sound does a duck make?",
    "What is the difference between weather and climate?",
    "What language is spoken in Brazil?",
    "Why do leaves change color in autumn?",
    "What is a prime number?",
    "Recommend a hobby for a rainy day.",
    "Where do penguins live?",
    "What keeps the Moon in orbit?",
    "Say something kind to a friend who is sad.",
    "What is the currency of Japan?",
)


@torch.no_grad()
def replay_conversations(hf_model, tokenizer, batch_size: int, prompts=REPLAY_PROMPTS) -> list[list[dict]]:
    """The model's own greedy answer to each prompt, as a user/assistant conversation; answers that do not
    end within ``REPLAY_ANSWER_TOKENS`` tokens are left out (a cut answer would teach stopping mid-sentence)."""
    was_training = hf_model.training
    hf_model.eval()
    answers = greedy_answers(hf_model, tokenizer, chat_prompt_ids(tokenizer, prompts), REPLAY_ANSWER_TOKENS, batch_size)
    hf_model.train(was_training)
    eos = eos_ids(hf_model, tokenizer)
    conversations = []
    for prompt, answer in zip(prompts, answers):
        if answer and answer[-1] in eos and (text := tokenizer.decode(answer[:-1], skip_special_tokens=True).strip()):
            conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}])
    return conversations


def replay_count(num_task_examples: int, share: float) -> int:
    """How many replay examples make ``share`` of the training examples beside ``num_task_examples``."""
    return round(num_task_examples * share / (1 - share)) if share > 0 else 0


def repeated(items: list, count: int) -> list:
    """``count`` items: ``items`` over and over, in order."""
    return [items[i % len(items)] for i in range(count)] if items else []
