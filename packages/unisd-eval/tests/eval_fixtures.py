"""Small datasets in the real hub field layout of each benchmark (unisd-method.md §4.1), written by us."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MBPP_SANITIZED = [
    {  # the reference defines another name than the asserts call: the name fix must apply
        "source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 2,
        "prompt": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n  return (res) ",
        "test_imports": [],
        "test_list": [
            "assert set(shared_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
            "assert set(shared_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
        ],
    },
    {
        "source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 3,
        "prompt": "Write a python function to identify non-prime numbers.",
        "code": "import math\ndef is_not_prime(n):\n    result = False\n    for i in range(2,int(math.sqrt(n)) + 1):\n"
                "        if n % i == 0:\n            result = True\n    return result",
        "test_imports": ["import math"],
        "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                      "assert math.isclose(float(is_not_prime(35)), 1.0)"],
    },
]
MBPP_FULL = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.",
     "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n"
             "            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n"
             "            break\r\n    return s ",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
     "test_setup_code": "", "challenge_test_list": []},
]
HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
     "canonical_solution": "    return 2 * x\n", "entry_point": "double",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]
SCIENCEQA = [
    {"image": None, "question": "Which tense does the sentence use?\nMona will print her name.",
     "choices": ["future tense", "present tense", "past tense"], "answer": 0, "hint": "",
     "task": "closed choice", "grade": "grade2", "subject": "language science", "topic": "verbs",
     "category": "Verb tense", "skill": "Is the sentence in the past, present, or future tense?",
     "lecture": "Present tense verbs tell you about something that is happening now.",
     "solution": "The sentence is in future tense. You can tell because it uses will before the main verb."},
    {"image": {"bytes": "..."}, "question": "Which country is highlighted?", "choices": ["Fiji", "Tonga"],
     "answer": 1, "hint": "", "subject": "social science", "topic": "geography", "lecture": "", "solution": ""},
    {"image": None, "question": "Which word would you find on a dictionary page with the guide words lamb - lump?",
     "choices": ["lever", "loop"], "answer": 1, "hint": "Look at the guide words.", "subject": "language science",
     "topic": "reference-skills", "lecture": "", "solution": ""},
]
COS_E = [
    {"id": "075e483d21c29a511267ef62bedc0461",
     "question": "The sanctions against the school were a punishing blow, and they seemed to what the efforts the school had made to change?",
     "choices": ["ignore", "enforce", "authoritarian", "yell at", "avoid"], "answer": "ignore",
     "abstractive_explanation": "ignoring the efforts is what the sanctions seemed to do",
     "extractive_explanation": "seemed to"},
    {"id": "61fe6e879ff18686d7552425a36344c8", "question": "Sammy wanted to go to where the people were.  Where might he go?",
     "choices": ["race track", "populated areas", "the desert", "apartment", "roadblock"], "answer": "populated areas",
     "abstractive_explanation": "", "extractive_explanation": ""},
]
MEDMCQA = [
    {"id": "e9ad821a-c438-4965-9f77-760819dfa155", "question": "Chronic urethral obstruction due to benign prismatic hyperplasia can lead to the following change in kidney parenchyma",
     "opa": "Hyperplasia", "opb": "Hyperophy", "opc": "Atrophy", "opd": "Dyplasia", "cop": 2, "choice_type": "single",
     "exp": "Chronic urethral obstruction leads to atrophy.", "subject_name": "Anatomy", "topic_name": "Urinary tract"},
    {"id": "hidden-label", "question": "Test-split row without a label", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
     "cop": -1, "choice_type": "single", "exp": None, "subject_name": "Anatomy", "topic_name": None},
    {"id": "x2", "question": "Which vitamin is supplied from only animal source?", "opa": "Vitamin C", "opb": "Vitamin B7",
     "opc": "Vitamin B12", "opd": "Vitamin D", "cop": 2, "choice_type": "single", "exp": "",
     "subject_name": "Biochemistry", "topic_name": "Vitamins"},
]
GPQA = [
    {"Question": "What is the spin of a photon?", "Correct Answer": "1", "Incorrect Answer 1": "1/2",
     "Incorrect Answer 2": "0", "Incorrect Answer 3": "3/2", "Explanation": "Photons are vector bosons.",
     "High-level domain": "Physics", "Subdomain": "Quantum Mechanics", "Record ID": "rec1"},
    {"Question": "Which element has atomic number 6?", "Correct Answer": "Carbon", "Incorrect Answer 1": "Nitrogen",
     "Incorrect Answer 2": "Oxygen", "Incorrect Answer 3": "Boron", "Explanation": "",
     "High-level domain": "Chemistry", "Subdomain": "General", "Record ID": "rec2"},
]
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,000 pens at $1.50 each. How much money does it make?",
     "answer": "1000 * 1.5 = <<1000*1.5=1500>>1500\n#### 1,500"},
]
TOOL_PROMPT = (
    "Answer the following questions as best you can. You have access to the following tools:\n\n"
    "getWeather: Get the weather of a city.\nParameters: {\"city\": \"Required. string.\", \"unit\": \"string. C or F\"}\n\n"
    "Use the following format:\n\nQuestion: the input question you must answer\nThought: you should always think about what to do\n"
    "Action: the action to take, should be one of [getWeather]\nAction Input: the input to the action\n"
    "Observation: the result of the action\n\nBegin!\n\nQuestion: What's the weather in Paris in Celsius?\n"
)
TOOLUSE = [
    {"name": "Weather", "instruction": "What's the weather in Paris in Celsius?", "prompt": TOOL_PROMPT,
     "golden_response": ["Thought: I need to get the weather of Paris in Celsius.", "Action: getWeather",
                         'Action Input: {"city": "Paris", "unit": "C"}'],
     "golden_answer": [{"Action": "getWeather", "Action_Input": '{"city": "Paris", "unit": "C"}'}]},
    {"name": "Weather", "instruction": "Weather in Rome?", "prompt": TOOL_PROMPT.replace("Paris in Celsius", "Rome"),
     "golden_response": [],
     "golden_answer": [{"Action": "getWeather", "Action_Input": '{"city": "Rome", "unit": ""}'}]},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSONL, JSON or CSV, by the file's suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path
