"""The embedded offline TL;DR task: data generator, hidden gold judge, tokenizer and tiny base models.

The real pipeline (Huang et al. 2024) needs Reddit TL;DR data, OpenAI's human comparisons, Pythia and a
GPT judge. None of those is reachable offline, so this file builds a small stand-in with the same shapes:

* every post is the surface realisation of a hidden structured record (narrator age/gender, the other
  person, how long they have known each other, what happened, a feeling, the question asked) plus
  irrelevant distractor sentences and neutral filler, so a good summary must select and compress;
* reference TL;DRs are written from the record with human-like variety and imperfection (about a third miss
  a salient fact or carry an irrelevant detail), so a trained policy can beat them;
* `GoldJudge` scores a summary against the record (weighted salient facts covered, minus contradicting or
  invented facts, irrelevant details, repetition, non-words, truncation and length) and stands in for both
  the human raters and the GPT-4 judge;
* preference comparisons in OpenAI's raw schema are labelled by the gold judge through a Bradley-Terry draw
  whose temperature is calibrated so that labels agree with the noiseless judge ~75% of the time;
* a byte-level BPE tokenizer (`<|endoftext|>` = id 0 = EOS, no pad) and tiny GPT-NeoX (Pythia
  architecture) base models pretrained as plain LMs on posts (never on TL;DRs).

Usage: python embedded_task.py --out_dir runs/task --seed 1 --sizes s,m,l
Layout: see SPEC.md ("Embedded task layout").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"

# =====================================================================================================
# 1. The lexicon: slot values and their surface forms. Every categorical fact value has
#    - "anchors": lower-case phrases the judge matches (several surface forms per value),
#    - "post": sentence templates for the post, "summ": short phrases for summaries.
#    Anchors of different values never overlap, and no template of one value contains an anchor of another
#    (checked by `check_lexicon` and by the tests).
# =====================================================================================================

NUM_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
             "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a": 1, "an": 1}
WORD_OF = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 10: "ten"}

# other person: value -> (gender or None = random, category, summary forms, post form)
OTHERS: Dict[str, dict] = {
    "boyfriend": dict(g="M", cat="romantic", anchors=["boyfriend", "bf"], post="boyfriend"),
    "girlfriend": dict(g="F", cat="romantic", anchors=["girlfriend", "gf"], post="girlfriend"),
    "husband": dict(g="M", cat="married", anchors=["husband", "hubby"], post="husband"),
    "wife": dict(g="F", cat="married", anchors=["wife"], post="wife"),
    "best friend": dict(g=None, cat="friend", anchors=["best friend", "bff", "bestie"], post="best friend"),
    "roommate": dict(g=None, cat="roommate", anchors=["roommate", "roomie", "flatmate"], post="roommate"),
    "sister": dict(g="F", cat="family", anchors=["sister", "sis"], post="sister"),
    "brother": dict(g="M", cat="family", anchors=["brother", "bro"], post="brother"),
    "mom": dict(g="F", cat="parent", anchors=["mom", "mother", "mum"], post="mom"),
    "dad": dict(g="M", cat="parent", anchors=["dad", "father"], post="dad"),
    "coworker": dict(g=None, cat="work", anchors=["coworker", "co-worker", "colleague"], post="coworker"),
    "boss": dict(g=None, cat="work", anchors=["boss", "manager", "supervisor"], post="boss"),
    "neighbor": dict(g=None, cat="neighbor", anchors=["neighbor", "neighbour"], post="neighbor"),
}

# duration phrase used in the post intro, by category of the other person ({d} = the duration)
DURATION_POST = {
    "romantic": ["we have been together for {d}", "we've been dating for {d}", "we have been a couple for {d}"],
    "married": ["we have been married for {d}", "we've been married for {d} now"],
    "friend": ["we have been friends for {d}", "we've known each other for {d}"],
    "roommate": ["we have been living together for {d}", "we've shared an apartment for {d}"],
    "family": ["we have been living together for {d}", "I moved in with {him} {d} ago"],
    "parent": ["I moved back in with {him} {d} ago", "I have been living with {him} again for {d}"],
    "work": ["we have been working together for {d}", "I have worked with {him} for {d}"],
    "neighbor": ["{he} has lived next door for {d}", "we have been neighbors for {d}"],
}
DURATION_SUMM = {  # how a summary attaches the duration to the other person
    "romantic": ["my {o} of {d}", "my {o} ({d})"], "married": ["my {o} of {d}", "my {o} ({d} married)"],
    "friend": ["my {o} of {d}", "my {o} ({d})"], "roommate": ["my {o} of {d}", "my {o} ({d})"],
    "family": ["my {o} (living together {d})", "my {o} who I've lived with for {d}"],
    "parent": ["my {o} (moved back in {d} ago)", "my {o}, who I moved back in with {d} ago,"],
    "work": ["my {o} of {d}", "my {o} ({d})"], "neighbor": ["my {o} of {d}", "my {o} ({d})"],
}
DURATIONS_MONTHS = [3, 4, 6, 8, 12, 24, 36, 48, 60, 72, 96, 120]  # duration slot values (in months)

# what happened: anchors (judge), post templates, summary phrases (third person verb phrase, subject {he})
EVENTS: Dict[str, dict] = {
    "forgot_birthday": dict(anchors=["birthday", "bday"], post=[
        "{he} completely forgot my birthday last week.", "My birthday was on Saturday and {he} forgot about it entirely.",
        "Last week was my birthday and {he} did not even remember it."],
        summ=["forgot my birthday", "forgot my bday", "didn't remember my birthday"]),
    "cheated": dict(anchors=["cheated", "cheating", "cheat"], cats=["romantic", "married"], post=[
        "A few days ago I found out that {he} cheated on me.", "{he} admitted to cheating on me last weekend.",
        "I recently discovered {he} has been cheating on me."],
        summ=["cheated on me", "has been cheating on me"]),
    "read_phone": dict(anchors=["my phone", "through my phone"], post=[
        "{he} went through my phone while I was asleep and read all my messages.",
        "Last night I caught {him} going through my phone without asking."],
        summ=["went through my phone", "snooped through my phone"]),
    "borrowed_money": dict(anchors=["money", "borrowed", "loan"], post=[
        "{he} borrowed a lot of money from me and never paid me back.",
        "Months ago I gave {him} a loan and {he} still hasn't paid any of it back."],
        summ=["borrowed money and never paid me back", "won't pay back the money {he} borrowed"]),
    "lied_job": dict(anchors=["job"], post=[
        "I just learned that {he} lied to me about losing {his} job.",
        "It turns out {he} lost {his} job and kept it from me by pretending to go to work every day."],
        summ=["lied about losing {his} job", "hid that {he} lost {his} job"]),
    "crashed_car": dict(anchors=["car", "crashed"], post=[
        "{he} took my car without asking and crashed it.", "Last weekend {he} crashed my car and acted like it was nothing."],
        summ=["crashed my car", "wrecked my car"]),
    "invited_ex": dict(anchors=["ex", "exes"], cats=["romantic", "married", "friend"], post=[
        "{he} invited {his} ex to our party without telling me.", "I found out {he} has been secretly hanging out with {his} ex."],
        summ=["invited {his} ex to our party", "has been hanging out with {his} ex"]),
    "skipped_wedding": dict(anchors=["wedding"], post=[
        "{he} skipped my cousin's wedding at the last minute.", "{he} didn't show up to my cousin's wedding even though {he} promised."],
        summ=["skipped my cousin's wedding", "bailed on my cousin's wedding"]),
    "ghosted": dict(anchors=["ghosted", "stopped talking to me", "silent treatment"], post=[
        "For the past week {he} has basically ghosted me.", "Out of nowhere {he} stopped talking to me and gives me the silent treatment."],
        summ=["ghosted me", "stopped talking to me", "is giving me the silent treatment"]),
    "weight_comment": dict(anchors=["weight", "fat"], post=[
        "{he} made a nasty comment about my weight in front of everyone.", "At dinner {he} called me fat in front of our friends."],
        summ=["made fun of my weight", "called me fat in front of everyone"]),
    "cancelled_trip": dict(anchors=["trip", "vacation"], post=[
        "{he} cancelled our trip at the last minute.", "We had planned a vacation for months and {he} backed out the day before."],
        summ=["cancelled our trip last minute", "backed out of our vacation"]),
    "took_credit": dict(anchors=["took credit", "credit for my"], cats=["work", "friend", "roommate"], post=[
        "In a big meeting {he} took credit for my project.", "{he} took credit for my work in front of the whole team."],
        summ=["took credit for my work", "took credit for my project"]),
    "told_secret": dict(anchors=["secret"], post=[
        "{he} told everyone a secret I had trusted {him} with.", "I told {him} a secret and {he} spread it around."],
        summ=["told everyone my secret", "spread my secret around"]),
    "airport": dict(anchors=["airport"], post=[
        "{he} forgot to pick me up from the airport and I waited for hours.", "{he} promised to get me from the airport and never showed."],
        summ=["forgot to pick me up from the airport", "left me stranded at the airport"]),
    "drunk_graduation": dict(anchors=["drunk", "graduation"], post=[
        "{he} showed up drunk to my graduation.", "At my graduation {he} got drunk and made a scene."],
        summ=["showed up drunk to my graduation", "got drunk at my graduation"]),
    "ate_leftovers": dict(anchors=["leftovers", "groceries"], cats=["roommate", "family", "parent", "romantic", "married"], post=[
        "{he} keeps eating my leftovers and groceries without asking.", "Every week {he} eats the groceries I buy for myself."],
        summ=["keeps eating my leftovers", "eats my groceries without asking"]),
    "read_diary": dict(anchors=["diary", "journal"], post=[
        "{he} found my diary and read the whole thing.", "I caught {him} reading my journal."],
        summ=["read my diary", "read my journal"]),
    "locked_out": dict(anchors=["locked me out", "locked out"], post=[
        "After an argument {he} locked me out of the apartment for the night.", "{he} locked me out and I had to sleep in the hallway."],
        summ=["locked me out", "locked me out of the apartment"]),
    "broke_tv": dict(anchors=["tv", "television"], post=[
        "{he} broke my TV and refuses to pay for it.", "During a game night {he} knocked over my TV and it shattered."],
        summ=["broke my TV", "broke my TV and won't pay"]),
    "hid_debt": dict(anchors=["debt"], cats=["romantic", "married", "family", "parent"], post=[
        "I found out {he} has been hiding a huge debt from me.", "{he} has a massive debt that {he} never mentioned."],
        summ=["hid a huge debt from me", "has been hiding debt"]),
    "stood_up": dict(anchors=["stood me up", "no-show"], post=[
        "{he} stood me up at dinner on Friday.", "We had plans on Friday and {he} stood me up without a word."],
        summ=["stood me up", "stood me up at dinner"]),
    "yelled": dict(anchors=["yelled", "screamed"], post=[
        "{he} yelled at me in front of a group of people.", "Over something tiny {he} screamed at me in public."],
        summ=["yelled at me in public", "screamed at me in front of people"]),
    "posted_photos": dict(anchors=["photos", "pictures", "pics"], post=[
        "{he} posted photos of me online without asking.", "{he} shared private pictures of me online."],
        summ=["posted photos of me online", "shared pics of me without asking"]),
    "missed_surgery": dict(anchors=["surgery", "hospital"], post=[
        "When I had surgery {he} never came to the hospital once.", "I was in the hospital for surgery and {he} didn't visit or call."],
        summ=["never visited me after my surgery", "didn't come to the hospital"]),
}

FEELINGS: Dict[str, List[str]] = {  # value -> anchors (first is the canonical form)
    "hurt": ["hurt"], "angry": ["angry", "mad", "pissed off", "pissed"], "confused": ["confused"],
    "betrayed": ["betrayed"], "anxious": ["anxious", "stressed"], "embarrassed": ["embarrassed", "humiliated"],
    "jealous": ["jealous"], "sad": ["sad", "heartbroken", "devastated"], "guilty": ["guilty"],
    "frustrated": ["frustrated", "annoyed"], "disrespected": ["disrespected"], "lonely": ["lonely"],
}
FEELING_POST = ["I feel so {f}.", "Honestly I'm really {f} about it.", "I've been feeling {f} ever since.",
                "I can't stop feeling {f}.", "I'm just so {f} right now."]
FEELING_SUMM = ["I feel {f}", "I'm {f}", "feeling {f}", "I'm really {f}", "now I'm {f}"]

QUESTIONS: Dict[str, dict] = {
    "break_up": dict(anchors=["break up", "breakup", "end things"], post=[
        "Should I break up with {him}?", "Is this a reason to end things?"], summ=["should I break up with {him}", "should I end things"]),
    "confront": dict(anchors=["confront", "bring it up"], post=[
        "How do I confront {him} about this?", "How should I bring it up with {him}?"],
        summ=["how do I confront {him}", "how do I bring it up"]),
    "overreacting": dict(anchors=["overreacting", "overreact"], post=[
        "Am I overreacting here?", "Am I overreacting or is this a big deal?"], summ=["am I overreacting", "am I overreacting here"]),
    "forgive": dict(anchors=["forgive"], post=["Should I forgive {him}?", "Is it possible to forgive {him} for this?"],
                    summ=["should I forgive {him}", "can I forgive {him}"]),
    "move_out": dict(anchors=["move out", "moving out"], post=["Should I move out?", "Would it be crazy to move out over this?"],
                     summ=["should I move out", "do I move out"]),
    "cut_off": dict(anchors=["cut him off", "cut her off", "cut ties"], post=[
        "Should I cut {him} off completely?", "Is it time to cut ties with {him}?"], summ=["should I cut {him} off", "should I cut ties"]),
    "let_go": dict(anchors=["let it go"], post=["Should I just let it go?", "Do I just let it go and move on?"],
                   summ=["should I let it go", "do I just let it go"]),
    "apologize": dict(anchors=["apologize", "apology"], post=[
        "Should I be the one to apologize?", "Do I owe {him} an apology for how I reacted?"],
        summ=["should I apologize", "do I owe {him} an apology"]),
    "tell_others": dict(anchors=["tell anyone", "tell someone"], post=[
        "Should I tell anyone about this?", "Should I tell someone or keep it to myself?"],
        summ=["should I tell anyone", "do I tell someone"]),
    "rebuild_trust": dict(anchors=["trust", "rebuild"], post=[
        "How do we rebuild trust after this?", "Can I ever trust {him} again?"], summ=["how do I trust {him} again", "how do we rebuild trust"]),
    "is_normal": dict(anchors=["normal"], post=["Is this normal?", "Is this kind of thing normal?"],
                      summ=["is this normal", "is that normal"]),
}

# irrelevant details: each is recordable and detectable by its anchors
DISTRACTORS: Dict[str, dict] = {
    "cat": dict(anchors=["cat", "luna"], post="We have a cat named Luna.", summ="we have a cat"),
    "nurse": dict(anchors=["nurse"], post="I work as a nurse, so my hours are long.", summ="I'm a nurse"),
    "rain": dict(anchors=["raining", "rain"], post="It was raining pretty hard that day.", summ="it was raining"),
    "pizza": dict(anchors=["pizza"], post="We had ordered pizza that night.", summ="we had pizza"),
    "ohio": dict(anchors=["ohio"], post="We live in a small town in Ohio.", summ="we live in Ohio"),
    "gym": dict(anchors=["gym"], post="I go to the gym most mornings.", summ="I go to the gym"),
    "guitar": dict(anchors=["guitar"], post="I have been learning to play the guitar.", summ="I play guitar"),
    "coffee": dict(anchors=["coffee"], post="I was having my morning coffee at the time.", summ="I was having coffee"),
    "netflix": dict(anchors=["netflix"], post="We were halfway through a Netflix show.", summ="we were watching Netflix"),
    "plants": dict(anchors=["plants"], post="My apartment is full of plants.", summ="I have lots of plants"),
    "tuesday": dict(anchors=["tuesday"], post="This was on a Tuesday, I think.", summ="it was a Tuesday"),
    "mobile": dict(anchors=["mobile"], post="Sorry for the formatting, I'm on mobile.", summ="on mobile"),
    "throwaway": dict(anchors=["throwaway"], post="Using a throwaway for obvious reasons.", summ="throwaway account"),
    "college": dict(anchors=["college"], post="I'm in my last semester of college.", summ="I'm in college"),
    "marathon": dict(anchors=["marathon"], post="I'm training for a half marathon.", summ="I'm training for a marathon"),
    "blue": dict(anchors=["blue"], post="The walls of our living room are blue, for what it's worth.", summ="our walls are blue"),
    "soccer": dict(anchors=["soccer"], post="I played soccer all through high school.", summ="I played soccer"),
    "kitchen": dict(anchors=["kitchen"], post="Our kitchen is being remodeled right now.", summ="our kitchen is being remodeled"),
    "vegan": dict(anchors=["vegan"], post="I have been vegan for a while.", summ="I'm vegan"),
    "italy": dict(anchors=["italy"], post="My family is originally from Italy.", summ="my family is from Italy"),
    "sushi": dict(anchors=["sushi"], post="Sushi is my favorite thing to eat.", summ="I love sushi"),
    "book_club": dict(anchors=["book club"], post="I'm part of a book club on Thursdays.", summ="I'm in a book club"),
    "video_games": dict(anchors=["video games"], post="I play video games to relax.", summ="I play video games"),
    "garden": dict(anchors=["garden"], post="I had spent the morning in the garden.", summ="I was in the garden"),
    "bus": dict(anchors=["bus"], post="I take the bus to work every day.", summ="I take the bus"),
    "painting": dict(anchors=["painting"], post="I like painting on weekends.", summ="I like painting"),
    "hiking": dict(anchors=["hiking"], post="We both like hiking.", summ="we like hiking"),
    "wifi": dict(anchors=["wifi"], post="Our wifi has been terrible lately.", summ="our wifi is bad"),
    "snow": dict(anchors=["snow", "snowing"], post="It was snowing that whole week.", summ="it was snowing"),
    "chess": dict(anchors=["chess"], post="I have been getting into chess lately.", summ="I play chess"),
    "piano": dict(anchors=["piano"], post="I teach piano lessons on the side.", summ="I teach piano"),
    "cookies": dict(anchors=["cookies"], post="I had baked cookies that morning.", summ="I baked cookies"),
    "texas": dict(anchors=["texas"], post="I grew up in Texas.", summ="I grew up in Texas"),
    "laptop": dict(anchors=["laptop"], post="My laptop broke that same week.", summ="my laptop broke"),
    "concert": dict(anchors=["concert"], post="We had tickets to a concert later that month.", summ="we had concert tickets"),
    "goldfish": dict(anchors=["goldfish"], post="My goldfish died around then too.", summ="my goldfish died"),
}

FILLER_INTRO = ["Some background first.", "I'll try to keep this short.", "Sorry in advance for the long post.",
                "I don't really know where else to ask.", "I need some outside perspective.", "Long time lurker, first post."]
FILLER_MID = ["Things had been going pretty well until recently.", "I didn't say anything at the time.",
              "It all happened really fast.", "I keep going back and forth on this.", "My friends have mixed opinions.",
              "It's been on my mind all week.", "We usually get along really well.", "I honestly never saw this coming.",
              "When I asked about it {he} just shrugged.", "{he} says it's not a big deal.",
              "I tried to talk about it but it went nowhere.", "This isn't the first time something like this happened.",
              "I don't want to make things worse.", "Part of me thinks I should just stay quiet.",
              "{he} acted like everything was fine the next day.", "I haven't slept well since.",
              "We talked for a bit but nothing got resolved.", "I keep replaying it in my head."]
FILLER_END = ["Any advice would be appreciated.", "Thanks for reading.", "Thanks in advance.",
              "I just want to do the right thing here.", "Please help."]

SUBREDDITS = {
    "romantic": ["relationships", "relationship_advice", "dating_advice"],
    "married": ["relationships", "relationship_advice", "Marriage"],
    "friend": ["relationships", "Advice", "AskReddit"], "roommate": ["roommates", "Advice", "relationships"],
    "family": ["relationships", "Advice", "family"], "parent": ["relationships", "Advice", "family"],
    "work": ["Advice", "jobs", "careerguidance"], "neighbor": ["Advice", "AskReddit", "relationships"],
}
# glue words: a summary made almost only of fact keywords ("24f bf 3 years birthday hurt") is incoherent
GLUE_WORDS = {"my", "i", "i'm", "i've", "me", "and", "of", "the", "to", "a", "an", "is", "am", "are", "should", "how",
              "do", "does", "with", "for", "about", "at", "in", "on", "he", "she", "him", "her", "his", "we", "our",
              "it", "this", "that", "so", "but", "has", "have", "been", "was", "did", "feel", "feeling", "what", "can",
              "now", "up", "out", "after", "over", "who", "from", "just", "be", "not", "never", "won't", "didn't",
              "back", "really", "also", "there", "or", "without"}
# words that make a summary look cut off when they end it (Detail-free: judge heuristics)
TRAILING_FUNCTION_WORDS = {"and", "the", "a", "an", "my", "to", "of", "with", "but", "he", "she", "i", "for", "in",
                           "on", "at", "so", "that", "is", "was", "his", "her", "about", "or", "because", "who", "we"}


def _pron(g: str) -> dict:
    return {"he": "he" if g == "M" else "she", "him": "him" if g == "M" else "her", "his": "his" if g == "M" else "her"}


def _fmt(template: str, g: str, **kw) -> str:
    p = _pron(g)
    s = template.format(he=p["he"], him=p["him"], his=p["his"], **kw)
    return s


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def duration_text(months: int, rng: random.Random, words: bool = True) -> str:
    """A surface form of a duration value."""
    if months < 12:
        n, unit = months, "months"
        forms = [f"{n} months", f"{n} mos"] + ([f"{WORD_OF[n]} months"] if words and n in WORD_OF else [])
    else:
        n = months // 12
        if n == 1:
            forms = ["1 year", "a year", "one year"] if words else ["1 year"]
        else:
            forms = [f"{n} years", f"{n} yrs"] + ([f"{WORD_OF[n]} years"] if words and n in WORD_OF else [])
    return rng.choice(forms)


# =====================================================================================================
# 2. Records and their surface realisation
# =====================================================================================================

@dataclass
class GenConfig:
    seed: int = 1
    n_sft_train: int = 6000
    n_sft_val: int = 500
    n_sft_test: int = 500
    n_cmp_train: int = 6000
    n_cmp_val: int = 1000
    cmp_per_post: int = 2  # comparisons per comparison post (the real data has several per post)
    n_pretrain_posts: int = 16000
    p_pretrain_edit: float = 0.0  # share of pretraining posts ending with an "EDIT:" restating facts (a knob, off)
    target_agreement: float = 0.75  # label agreement with the noiseless judge (human raters agree ~70-80%)
    # What a human TL;DR states (design in docs/embedded_task.md): humans lose on coverage and focus, not on copying.
    p_ref_question: float = 0.35  # a human reference states the poster's question (most real TL;DRs leave it out)
    p_ref_feeling: float = 0.3  # ... states the poster's feeling
    p_ref_miss: float = 0.2  # ... misses one more salient fact (the narrator, the duration, the other person, the event)
    p_ref_irrelevant: float = 0.2  # ... carries an irrelevant detail of the post
    post_words: Tuple[int, int] = (45, 90)  # the post's length in words (drawn uniformly; fillers make up the rest)
    version: int = 4  # bump when the generator's output changes


def _age_gender(rng: random.Random, other: str, narrator_age: int) -> Tuple[int, str]:
    info = OTHERS[other]
    g = info["g"] or rng.choice("MF")
    cat = info["cat"]
    if cat == "parent":
        age = narrator_age + rng.randint(20, 32)
    elif cat == "family":
        age = max(14, narrator_age + rng.randint(-8, 8))
    elif cat == "work" or cat == "neighbor":
        age = max(18, narrator_age + rng.randint(-10, 20))
    else:
        age = max(18, narrator_age + rng.randint(-4, 6))
    if age == narrator_age:
        age += 1
    return age, g


def make_record(rng: random.Random, post_id: str) -> dict:
    """Draw the hidden structured record of one post."""
    other = rng.choice(list(OTHERS))
    cat = OTHERS[other]["cat"]
    n_age = rng.randint(18, 39)
    n_g = rng.choice("MF")
    o_age, o_g = _age_gender(rng, other, n_age)
    events = [e for e, v in EVENTS.items() if cat in v.get("cats", [cat])]
    dur_choices = [m for m in DURATIONS_MONTHS if not (cat in ("family", "parent", "work", "neighbor") and m > 96)]
    return dict(
        id=post_id, narrator_age=n_age, narrator_gender=n_g, other=other, other_age=o_age, other_gender=o_g,
        category=cat, duration=rng.choice(dur_choices), event=rng.choice(events), feeling=rng.choice(list(FEELINGS)),
        question=rng.choice(list(QUESTIONS)), distractors=rng.sample(list(DISTRACTORS), rng.choice([1, 1, 2, 2, 3])),
    )


def _ag(age: int, g: str, rng: random.Random) -> str:
    return rng.choice([f"{age}{g}", f"{age}{g}", f"{age}{g.lower()}", f"{age} {g}"])


def realise_post(rec: dict, rng: random.Random, post_words: Tuple[int, int] = GenConfig.post_words) -> Tuple[str, str, str]:
    """Surface realisation of a record: (subreddit, title, post). Paragraphs are separated by newlines. Records the
    post's own words for the duration, the feeling and the question in `rec` (`duration_form`, `feeling_form`,
    `question_form`)."""
    g = rec["other_gender"]
    p = _pron(g)
    other = OTHERS[rec["other"]]["post"]
    cat = rec["category"]
    na, ng, oa = rec["narrator_age"], rec["narrator_gender"], rec["other_age"]
    d = duration_text(rec["duration"], rng)
    rec["duration_form"] = d  # the words the post uses, which a summary can copy
    dur = _fmt(rng.choice(DURATION_POST[cat]), g, d=d)
    intro = rng.choice([
        f"My ({na}{ng}) {other} ({oa}{g}) and I have known each other a long time; {dur}.",
        f"So my {other} ({oa}{g}) and I ({na}{ng}), {dur}.",
        f"I'm {na}{ng} and my {other} is {oa}{g}. {_cap(dur)}.",
        f"Me ({na}{ng}) and my {other} ({oa}{g}): {dur}.",
        f"{na}{ng} here. My {other} is {oa}{g} and {dur}.",
    ])
    if cat == "romantic" or cat == "married":
        intro = intro.replace("have known each other a long time; ", "")
    ev = EVENTS[rec["event"]]
    event_sent = _cap(_fmt(rng.choice(ev["post"]), g))
    feel = FEELINGS[rec["feeling"]]
    rec["feeling_form"] = rng.choice(feel)
    feel_sent = rng.choice(FEELING_POST).format(f=rec["feeling_form"])
    q = QUESTIONS[rec["question"]]
    q_sent = _fmt(rng.choice(q["post"]), g)
    rec["question_form"] = q_sent
    distractor_sents = [DISTRACTORS[k]["post"] for k in rec["distractors"]]

    mids = [_cap(_fmt(s, g)) for s in rng.sample(FILLER_MID, len(FILLER_MID))]
    paras: List[List[str]] = [[], [], [], []]
    if rng.random() < 0.5:
        paras[0].append(rng.choice(FILLER_INTRO))
    paras[0].append(intro)
    paras[1].append(event_sent)
    paras[2].append(feel_sent)
    paras[3].append(q_sent)
    # neutral filler until the post is long enough (a word-count target keeps the query under 256 tokens)
    target_words = rng.randint(*post_words)
    words = sum(len(s.split()) for pp in paras for s in pp) + sum(len(s.split()) for s in distractor_sents)
    slots = [0, 1, 1, 1, 2, 2]
    while words < target_words and mids:
        s = mids.pop()
        i = rng.choice(slots)
        paras[i].insert(rng.randint(1, len(paras[i])), s)
        words += len(s.split())
    for s in distractor_sents:
        i = rng.choice([0, 1, 2])
        paras[i].insert(rng.randint(0 if i else 1, len(paras[i])), s)
    if rng.random() < 0.7:
        paras[3].append(rng.choice(FILLER_END))
    sep = rng.choice(["\n\n", "\n\n", "\n"])
    post = sep.join(" ".join(pp) for pp in paras if pp)
    if rng.random() < 0.2:  # a mobile-ish single newline inside a paragraph
        post = post.replace(". ", ".\n", 1)

    o_ev = rng.choice(EVENTS[rec["event"]]["summ"])
    title = rng.choice([
        f"My ({na}{ng}) {other} ({oa}{g}) of {d} {_fmt(o_ev, g)}",
        f"Me [{na} {ng}] with my {other} [{oa} {g}] of {d}, {_fmt(q['summ'][0], g)}?",
        f"My {other} {_fmt(o_ev, g)}. {_cap(_fmt(rng.choice(q['summ']), g))}?",
        f"{_cap(_fmt(rng.choice(q['summ']), g))}? ({na}{ng})",
        f"Need advice about my {other}",
        "Not sure how to feel about this",
        f"My {other} ({oa}{g}) {_fmt(o_ev, g)}",
    ])
    subreddit = rng.choice(SUBREDDITS[cat])
    return subreddit, title, post


# =====================================================================================================
# 3. Summaries: human-like references and controlled variants ("policies")
# =====================================================================================================

def _summary_parts(rec: dict, rng: random.Random) -> Dict[str, str]:
    """The phrases a summary is written from. The narrator, the duration, the feeling and the question are stated
    in the post's own words (the post's "24F", `rec["duration_form"]`, `rec["feeling_form"]`,
    `rec["question_form"]`), as a TL;DR writer copies them: facts a small model can copy, not paraphrase."""
    g = rec["other_gender"]
    o = rng.choice(OTHERS[rec["other"]]["anchors"][:2] if rec["other"] != "best friend" else ["best friend", "bff"])
    d = rec.get("duration_form") or duration_text(rec["duration"], rng)
    feeling = rec.get("feeling_form") or rng.choice(FEELINGS[rec["feeling"]])
    return dict(
        narrator=f'{rec["narrator_age"]}{rec["narrator_gender"]}', other=o,
        other_age=_ag(rec["other_age"], g, rng), duration=d,
        other_dur=_fmt(rng.choice(DURATION_SUMM[rec["category"]]), g, o=o, d=d),
        event=_fmt(rng.choice(EVENTS[rec["event"]]["summ"]), g), he=_pron(g)["he"],
        feeling=rng.choice(FEELING_SUMM).format(f=feeling),
        question=_question_phrase(rec.get("question_form")) or _fmt(rng.choice(QUESTIONS[rec["question"]]["summ"]), g),
    )


def _question_phrase(sentence: Optional[str]) -> Optional[str]:
    """The post's question as a summary phrase: "Should I forgive him?" -> "should I forgive him"."""
    return sentence[:1].lower() + sentence[1:].rstrip("?") if sentence else None


SALIENT = ("narrator", "other", "duration", "event", "feeling", "question")


def compose_summary(rec: dict, rng: random.Random, drop: Sequence[str] = (), extra: Sequence[str] = (),
                    parts: Optional[dict] = None, concise: bool = False) -> str:
    """Write a summary of `rec` from its slots; `drop` removes salient slots, `extra` adds irrelevant phrases."""
    p = parts or _summary_parts(rec, rng)
    drop = set(drop)
    # subject: "I (24F) ... my bf of 3 years" / "my bf (26M) of 3 years"
    if "other" in drop:
        subj = p["he"] if "duration" in drop else f"{p['he']} ({p['duration']} now)"
    elif "duration" in drop:
        subj = f"my {p['other']}" + (f" ({p['other_age']})" if rng.random() < 0.3 and not concise else "")
    else:
        subj = p["other_dur"]
    ev = p["event"]
    if "event" in drop:
        ev = rng.choice(["did something that really upset me", "did something messed up", "and I had a big fight"])
    if "narrator" in drop:
        head = f"{subj} {ev}"
    else:
        head = rng.choice([f"{p['narrator']}, {subj} {ev}", f"Me ({p['narrator']}): {subj} {ev}",
                           f"{subj} {ev}, I'm {p['narrator']}"]) if not concise else f"{p['narrator']}, {subj} {ev}"
    pieces = [head]
    if "feeling" not in drop:
        pieces.append(rng.choice([". " + _cap(p["feeling"]), ", " + p["feeling"], " and " + p["feeling"]]))
    for e in extra:
        pieces.append(rng.choice([". Also " + e, ", " + e, ". (" + e + ")"]))
    if "question" not in drop:
        qq = p["question"]
        pieces.append(rng.choice([". " + _cap(qq) + "?", ". " + _cap(qq) + "?", ", " + qq + "?", ". " + qq]))
    else:
        pieces.append(rng.choice([".", "", ". Help."]))
    s = "".join(pieces)
    s = _cap(s)
    if not concise and rng.random() < 0.25:
        s = s.lower()
    return s.strip()


def human_reference(rec: dict, rng: random.Random, cfg: GenConfig) -> str:
    """A human-like TL;DR. It loses where Reddit's TL;DRs lose, on coverage and focus: it states the poster's
    question in `p_ref_question` of posts and the feeling in `p_ref_feeling`, misses one more salient fact in
    `p_ref_miss` and carries an irrelevant detail of the post in `p_ref_irrelevant`. What it states is right."""
    drop: List[str] = []
    if rng.random() >= cfg.p_ref_question:
        drop.append("question")
    if rng.random() >= cfg.p_ref_feeling:
        drop.append("feeling")
    if rng.random() < cfg.p_ref_miss:
        drop.append(rng.choice(["narrator", "narrator", "duration", "duration", "other", "event"]))
    extra = []
    if rng.random() < cfg.p_ref_irrelevant:
        extra = [DISTRACTORS[rng.choice(rec["distractors"])]["summ"]]
    return compose_summary(rec, rng, drop=drop, extra=extra)


def wrong_record(rec: dict, rng: random.Random) -> dict:
    """A copy of `rec` with one salient slot replaced by a contradicting value."""
    r = dict(rec)
    slot = rng.choice(["other", "duration", "event", "feeling", "question", "narrator"])
    if slot == "other":
        same_g = [o for o in OTHERS if o != rec["other"] and OTHERS[o]["cat"] not in ("parent",)]
        r["other"] = rng.choice(same_g)
        r["category"] = OTHERS[r["other"]]["cat"]
    elif slot == "duration":
        r["duration"] = rng.choice([m for m in DURATIONS_MONTHS if m != rec["duration"]])
        r.pop("duration_form", None)  # the post's words state the right value
    elif slot == "event":
        r["event"] = rng.choice([e for e in EVENTS if e != rec["event"]])
    elif slot == "feeling":
        r["feeling"] = rng.choice([f for f in FEELINGS if f != rec["feeling"]])
        r.pop("feeling_form", None)
    elif slot == "question":
        r["question"] = rng.choice([q for q in QUESTIONS if q != rec["question"]])
        r.pop("question_form", None)
    else:
        r["narrator_age"] = rng.choice([a for a in range(18, 40) if a not in (rec["narrator_age"], rec["other_age"])])
    return r


HARD_DETAILS = ("narrator_age", "duration", "feeling")  # the details the small SFT policies get wrong most often
_FEELING_WORD_RE = re.compile(r"\b(" + "|".join(sorted((re.escape(w) for ws in FEELINGS.values() for w in ws),
                                                        key=len, reverse=True)) + r")\b")


def near_miss(rec: dict, detail: str, rng: random.Random):
    """A wrong but plausible value of one hard detail, the kind a small model writes instead: an age a few years off
    (a 23M for a 27M), a neighbouring duration of the lexicon (8 months for 1 year), another feeling. Only values
    the task itself uses, so a reward model cannot spot the wrong one by its form or rarity."""
    if detail == "narrator_age":
        n = rec["narrator_age"]
        return rng.choice([a for a in range(max(18, n - 6), min(39, n + 6) + 1) if a not in (n, rec["other_age"])])
    if detail == "duration":
        i = DURATIONS_MONTHS.index(rec["duration"])
        return rng.choice([m for m in DURATIONS_MONTHS[max(0, i - 2): i + 3] if m != rec["duration"]])
    if detail == "feeling":
        return rng.choice([f for f in FEELINGS if f != rec["feeling"]])
    raise ValueError(f"near_miss: unknown detail {detail!r}; choose from {HARD_DETAILS}")


def set_detail(parts: Dict[str, str], detail: str, value, rng: random.Random) -> Dict[str, str]:
    """Summary parts (`_summary_parts`) that state one hard detail as `value`; every other word is unchanged."""
    p = dict(parts)
    if detail == "narrator_age":
        p["narrator"] = re.sub(r"^\d+", str(value), p["narrator"])
    elif detail == "duration":
        d = duration_text(value, rng)
        p["other_dur"], p["duration"] = p["other_dur"].replace(p["duration"], d, 1), d
    elif detail == "feeling":
        p["feeling"] = _FEELING_WORD_RE.sub(rng.choice(FEELINGS[value]), p["feeling"], count=1)
    else:
        raise ValueError(f"set_detail: unknown detail {detail!r}; choose from {HARD_DETAILS}")
    return p


def near_miss_pair(rec: dict, detail: str, rng: random.Random) -> Tuple[str, str]:
    """(right, wrong): a complete summary of `rec` and the same words with `detail` stated as a near miss. Both
    sides draw the detail's surface form the same way, so only its value tells them apart. A reward model that
    prefers `right` checks that detail against the post (the diagnostic `reward.py` reports as
    gold_near_miss_accuracy)."""
    seed = rng.random()
    parts = _summary_parts(rec, random.Random(seed))
    right = set_detail(parts, detail, rec[detail], rng)
    wrong = set_detail(parts, detail, near_miss(rec, detail, rng), rng)
    return tuple(compose_summary(rec, random.Random(seed), parts=x, concise=True) for x in (right, wrong))


POLICY_WEIGHTS = {  # the mix of "policies" whose summaries are compared
    "ref": 0.26, "concise_all_facts": 0.10, "ref_missing_fact": 0.13, "ref_wrong_fact": 0.10,
    "ref_padded_irrelevant": 0.10, "ref_truncated": 0.08, "ref_repetitive": 0.06, "other_post_ref": 0.06,
    "title_copy": 0.05, "lead_copy": 0.06,
}


def policy_summary(policy: str, rec: dict, title: str, post: str, other_rec: dict, rng: random.Random,
                   cfg: GenConfig) -> str:
    if policy == "ref":
        return human_reference(rec, rng, cfg)
    if policy == "concise_all_facts":
        return compose_summary(rec, rng, concise=True)
    if policy == "ref_missing_fact":
        return compose_summary(rec, rng, drop=rng.sample(["duration", "feeling", "question", "event", "other"],
                                                         rng.choice([1, 2, 3])))
    if policy == "ref_wrong_fact":
        return human_reference(wrong_record(rec, rng), rng, cfg)
    if policy == "ref_padded_irrelevant":
        k = rng.choice([1, 2, 3])
        extra = [DISTRACTORS[x]["summ"] for x in rng.sample(rec["distractors"], min(k, len(rec["distractors"])))]
        if len(extra) < k:
            extra += [rng.choice(FILLER_MID).format(**_pron(rec["other_gender"])).rstrip(".").lower()]
        return compose_summary(rec, rng, extra=extra)
    if policy == "ref_truncated":
        w = human_reference(rec, rng, cfg).split()
        return " ".join(w[: max(2, int(len(w) * rng.uniform(0.35, 0.8)))])
    if policy == "ref_repetitive":
        s = human_reference(rec, rng, cfg)
        w = s.split()
        i = rng.randint(0, max(0, len(w) - 4))
        chunk = " ".join(w[i:i + rng.randint(3, 5)])
        return s + (" " + chunk) * rng.randint(1, 3)
    if policy == "other_post_ref":
        return human_reference(other_rec, rng, cfg)
    if policy == "title_copy":
        return title
    if policy == "lead_copy":
        sents = re.split(r"(?<=[.?!])\s+", post.replace("\n", " "))
        return " ".join(sents[: rng.randint(2, 4)])
    raise ValueError(f"unknown policy {policy!r}")


# =====================================================================================================
# 4. The gold judge
# =====================================================================================================

def _phrase_regex(phrases: Iterable[str]) -> "re.Pattern":
    ps = sorted(set(phrases), key=lambda s: (-len(s), s))
    alt = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in ps)
    return re.compile(r"(?<![\w-])(?:" + alt + r")(?![\w-])")


_CAT_LEXICON: Dict[str, Tuple[str, str]] = {}  # phrase -> (slot, value)
for _v, _info in OTHERS.items():
    for _a in _info["anchors"]:
        _CAT_LEXICON[_a] = ("other", _v)
for _v, _info in EVENTS.items():
    for _a in _info["anchors"]:
        _CAT_LEXICON[_a] = ("event", _v)
for _v, _anchors in FEELINGS.items():
    for _a in _anchors:
        _CAT_LEXICON[_a] = ("feeling", _v)
for _v, _info in QUESTIONS.items():
    for _a in _info["anchors"]:
        _CAT_LEXICON[_a] = ("question", _v)
for _v, _info in DISTRACTORS.items():
    for _a in _info["anchors"]:
        _CAT_LEXICON[_a] = ("distractor", _v)
_CAT_RE = _phrase_regex(_CAT_LEXICON)
_NUM = r"(\d{1,2}|" + "|".join(sorted(NUM_WORDS, key=len, reverse=True)) + r")"
_DUR_RE = re.compile(r"(?<![\w-])" + _NUM + r"[\s-]?(years?|yrs?|months?|mos?)(?![\w])(?![\s-]*old)")
_AG_RE = re.compile(r"(?<![\w])(\d{2})\s?/?\s?([mf])(?![\w])")
_AG2_RE = re.compile(r"(?<![\w])(\d{2})[\s-]?(?:yo|y/o|year[\s-]old)\s(woman|man|guy|girl|female|male)(?![\w])")
_WORD_RE = re.compile(r"[a-z]+")
_TOKEN_RE = re.compile(r"[a-z0-9']+")


def _known_words() -> set:
    texts: List[str] = []

    def walk(x):
        if isinstance(x, str):
            texts.append(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k), walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    for obj in (OTHERS, DURATION_POST, DURATION_SUMM, EVENTS, FEELINGS, FEELING_POST, FEELING_SUMM, QUESTIONS,
                DISTRACTORS, FILLER_INTRO, FILLER_MID, FILLER_END, SUBREDDITS, list(NUM_WORDS), list(WORD_OF.values())):
        walk(obj)
    texts += ["he she him her his hers they them their i me my we our you your it its and or but so also help",
              "m f years year months month yrs yr mos mo now ago of for with to in on at the a an this that is was",
              "married moved back together living lived who i've i'm can't don't didn't won't it's what's tldr tl dr",
              "about here known each other long time me need advice not sure how feel did something really upset",
              "messed up big fight yo y o old woman man guy girl female male r post title subreddit"]
    words = set()
    for t in texts:
        words.update(_WORD_RE.findall(t.lower()))
    return words


KNOWN_WORDS = _known_words()


@dataclass
class JudgeWeights:
    """Weights of the gold score. A complete summary scores about 8; each mistake costs about one fact."""
    narrator: float = 0.75
    other: float = 1.5
    duration: float = 1.0
    event: float = 2.5
    feeling: float = 1.0
    question: float = 1.5
    wrong: float = 1.5  # per distinct contradicting / invented value (incl. facts of other posts)
    irrelevant: float = 0.7  # per irrelevant detail of this post
    invented_detail: float = 1.0  # per detail that is not in the post at all
    repeat_ngram: float = 0.4  # per repeated word 3-gram
    repeat_fact: float = 0.5  # per mention of one value beyond the second
    nonword: float = 0.5  # per unknown word
    truncated: float = 0.3  # ends on a function word
    incoherent: float = 3.0  # keyword salad: scaled by how far the share of glue words is below min_glue
    min_glue: float = 0.2
    per_word: float = 0.01  # slight preference for brevity (breaks ties between complete summaries)
    soft_limit_words: int = 32
    over_limit: float = 0.1  # per word beyond the soft limit


def _split_summary(summary: str) -> str:
    i = summary.find(EOS_TOKEN)
    if i >= 0:
        summary = summary[:i]
    return summary.replace(PAD_TOKEN, "")


def extract_facts(text: str) -> dict:
    """Find every fact mention in `text`: {"other": [...], "event": [...], ..., "ages": [(age, g)], "durations":
    [months]}. Pure regex, no record needed."""
    t = text.lower()
    found: Dict[str, list] = {"other": [], "event": [], "feeling": [], "question": [], "distractor": [],
                              "ages": [], "durations": []}
    for m in _CAT_RE.finditer(t):
        slot, value = _CAT_LEXICON[re.sub(r"\s+", " ", m.group(0))]
        found[slot].append(value)
    for m in _DUR_RE.finditer(t):
        n = m.group(1)
        n = int(n) if n.isdigit() else NUM_WORDS[n]
        found["durations"].append(n * 12 if m.group(2).startswith("y") else n)
    for m in _AG_RE.finditer(t):
        found["ages"].append((int(m.group(1)), m.group(2).upper()))
    for m in _AG2_RE.finditer(t):
        found["ages"].append((int(m.group(1)), "F" if m.group(2) in ("woman", "girl", "female") else "M"))
    return found


def score_against_record(rec: dict, summary: str, w: JudgeWeights = JudgeWeights(), details: bool = False):
    """The gold score of a summary (text only) against a record."""
    text = _split_summary(summary).strip()
    f = extract_facts(text)
    cover = 0.0
    wrong = 0
    rep_fact = 0
    for slot in ("other", "event", "feeling", "question"):
        vals = f[slot]
        if rec[slot] in vals:
            cover += getattr(w, slot)
        wrong += len(set(vals) - {rec[slot]})
        for v in set(vals):
            rep_fact += max(0, vals.count(v) - 2)
    durs = f["durations"]
    if rec["duration"] in durs:
        cover += w.duration
    wrong += len(set(durs) - {rec["duration"]})
    rep_fact += max(0, durs.count(rec["duration"]) - 2)
    me = (rec["narrator_age"], rec["narrator_gender"])
    them = (rec["other_age"], rec["other_gender"])
    if me in f["ages"]:
        cover += w.narrator
    wrong += len(set(f["ages"]) - {me, them})
    rep_fact += max(0, f["ages"].count(me) - 2)
    irr = len(set(f["distractor"]) & set(rec["distractors"]))
    inv = len(set(f["distractor"]) - set(rec["distractors"]))
    toks = _TOKEN_RE.findall(text.lower())
    tri = list(zip(toks, toks[1:], toks[2:]))
    rep_ngrams = len(tri) - len(set(tri))
    nonwords = sum(1 for wd in _WORD_RE.findall(text.lower()) if wd not in KNOWN_WORDS)
    n_words = len(text.split())
    glue = sum(1 for t in toks if t in GLUE_WORDS) / max(1, len(toks))
    incoherent = max(0.0, w.min_glue - glue) / w.min_glue if len(toks) >= 4 else 0.0
    truncated = bool(toks) and toks[-1] in TRAILING_FUNCTION_WORDS and not text.rstrip().endswith((".", "?", "!"))
    score = (cover - w.wrong * wrong - w.irrelevant * irr - w.invented_detail * inv - w.repeat_ngram * rep_ngrams
             - w.repeat_fact * rep_fact - w.nonword * nonwords - w.truncated * truncated - w.incoherent * incoherent - w.per_word * n_words
             - w.over_limit * max(0, n_words - w.soft_limit_words))
    if details:
        return score, dict(cover=cover, wrong=wrong, irrelevant=irr, invented=inv, repeated_ngrams=rep_ngrams,
                           repeated_facts=rep_fact, nonwords=nonwords, truncated=truncated, incoherent=incoherent, words=n_words)
    return score


def fact_outcomes(rec: dict, summary: str) -> Dict[str, str]:
    """Per salient fact of `rec`: "right" (its value is stated), "wrong" (only other values are) or "missing"."""
    f = extract_facts(_split_summary(summary))
    out = {}
    for slot in ("other", "event", "feeling", "question"):
        out[slot] = "right" if rec[slot] in f[slot] else ("wrong" if f[slot] else "missing")
    out["duration"] = "right" if rec["duration"] in f["durations"] else ("wrong" if f["durations"] else "missing")
    me, them = (rec["narrator_age"], rec["narrator_gender"]), (rec["other_age"], rec["other_gender"])
    out["narrator"] = "right" if me in f["ages"] else ("wrong" if set(f["ages"]) - {them} else "missing")
    return {k: out[k] for k in SALIENT}


def post_from_query(query_or_post: str) -> Tuple[Optional[str], str]:
    """(title or None, post text) from a Detail-1 query (text between "POST: " and "\\n\\nTL;DR:") or a raw post."""
    q = query_or_post
    if PAD_TOKEN in q or EOS_TOKEN in q:
        q = q.replace(PAD_TOKEN, "").replace(EOS_TOKEN, "")
    i = q.find("\n\nPOST: ")
    if q.startswith("SUBREDDIT:") and i >= 0:
        j = q.rfind("\n\nTL;DR:")
        post = q[i + len("\n\nPOST: "): j if j > i else len(q)]
        t = q.find("\n\nTITLE: ")
        title = q[t + len("\n\nTITLE: "): i] if 0 <= t < i else None
        return title, post
    return None, q


class GoldJudge:
    """The hidden evaluator of the embedded task (stands in for human raters and the GPT judge)."""

    def __init__(self, records: Sequence[dict], weights: JudgeWeights = JudgeWeights()):
        self.weights = weights
        self.records = {r["id"]: r for r in records}
        self.by_post = {r["post"]: r for r in records}
        self.by_prefix: Dict[str, List[dict]] = {}
        self.by_title: Dict[str, List[dict]] = {}
        for r in records:
            self.by_prefix.setdefault(r["post"][:48], []).append(r)
            self.by_title.setdefault(r["title"].strip(), []).append(r)

    @classmethod
    def from_dir(cls, task_dir: str) -> "GoldJudge":
        path = os.path.join(task_dir, "gold", "records.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no gold records at {path}: build the task with embedded_task.py --out_dir {task_dir}")
        return cls(read_jsonl(path))

    def record(self, query_or_post: str) -> dict:
        title, post = post_from_query(query_or_post)
        r = self.by_post.get(post)
        if r is not None:
            return r
        post_s = post.strip()
        # the post may be smart-truncated (Detail 2): match the title and the start of the post
        cands = self.by_prefix.get(post_s[:48], []) if len(post_s) >= 48 else self.by_title.get((title or "").strip(), [])
        for r in cands:
            if r["post"].startswith(post_s) and (title is None or r["title"].strip() == title.strip()):
                return r
        raise KeyError(f"GoldJudge: unknown post (not in gold/records.jsonl): {post_s[:80]!r}")

    def score(self, query_or_post: str, summary: str) -> float:
        return score_against_record(self.record(query_or_post), summary, self.weights)

    def details(self, query_or_post: str, summary: str) -> dict:
        s, d = score_against_record(self.record(query_or_post), summary, self.weights, details=True)
        d["score"] = s
        return d

    def fact_rates(self, queries: Sequence[str], summaries: Sequence[str]) -> Dict[str, Dict[str, float]]:
        """{fact: {"right": share, "wrong": share, "missing": share}} over the summaries (see `fact_outcomes`)."""
        if len(queries) != len(summaries) or not queries:
            raise ValueError("fact_rates: queries and summaries must be non-empty and of the same length")
        outs = [fact_outcomes(self.record(q), s) for q, s in zip(queries, summaries)]
        return {k: {o: sum(x[k] == o for x in outs) / len(outs) for o in ("right", "wrong", "missing")} for k in SALIENT}

    def compare(self, query: str, summary_a: str, summary_b: str) -> float:
        rec = self.record(query)
        a = score_against_record(rec, summary_a, self.weights)
        b = score_against_record(rec, summary_b, self.weights)
        if abs(a - b) < 1e-9:
            return 0.5
        return 1.0 if a > b else 0.0

    def prefers(self, query: str, a: str, b: str) -> int:
        """0 if a is strictly better, else 1 (ties go to b, the reference when used as (candidate, reference))."""
        return 0 if self.compare(query, a, b) == 1.0 else 1

    def win_rate(self, queries: Sequence[str], candidates: Sequence[str], references: Sequence[str]) -> float:
        if not (len(queries) == len(candidates) == len(references)):
            raise ValueError("win_rate: queries, candidates and references must have the same length")
        if not queries:
            return float("nan")
        return sum(self.prefers(q, c, r) == 0 for q, c, r in zip(queries, candidates, references)) / len(queries)

    def sample_metrics(self, queries: Sequence[str], responses: Sequence[str],
                       references: Sequence[str]) -> Tuple[Dict[str, float], List[Dict[str, float]]]:
        """What a stage adds to its evaluation with `--gold_task_dir`: ({"gold_win_rate", "gold_score"} over the
        samples, one {"gold_score", "gold_reference_score"} per sample for eval_samples.jsonl). The stage prefixes
        the keys (sft_, dpo_, eval/, ...); its own metrics never depend on this judge."""
        import numpy as np

        win_rate = float(self.win_rate(queries, responses, references))  # also checks the lengths agree
        per_row = [{"gold_score": float(self.score(q, r)), "gold_reference_score": float(self.score(q, ref))}
                   for q, r, ref in zip(queries, responses, references)]
        return {"gold_win_rate": win_rate, "gold_score": float(np.mean([r["gold_score"] for r in per_row]))}, per_row


# =====================================================================================================
# 5. Data set generation
# =====================================================================================================

def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def format_query(subreddit: str, title: str, post: str) -> str:
    # Detail 1: the query format (the embedded task uses the same template as the real data)
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


EDIT_OPENERS = ["EDIT: for those asking,", "Edit: to clarify,", "EDIT: since people asked,", "Update:", "Edit:"]


def edit_note(rec: dict, rng: random.Random, cfg: GenConfig) -> str:
    """With probability `p_pretrain_edit`, the "EDIT:" a Reddit poster appends to a post: two to four of the
    post's own facts restated in the post's words ("EDIT: to clarify, I'm 24F, we've been together 3 years"). The
    base model sees no summaries; these notes reward retrieving a fact from earlier in the context, the skill
    that copying a fact into a TL;DR needs (Pythia learns it from the Pile)."""
    if rng.random() >= cfg.p_pretrain_edit:
        return ""
    g = rec["other_gender"]
    other = OTHERS[rec["other"]]["post"]
    facts = [f"I'm {rec['narrator_age']}{rec['narrator_gender']}", f"my {other} is {rec['other_age']}{g}",
             f"it's been {rec['duration_form']}", f"I'm {rec['feeling_form']}",
             f"my question is: {_question_phrase(rec['question_form'])}",
             f"{_pron(g)['he']} {_fmt(rng.choice(EVENTS[rec['event']]['summ']), g)}"]
    picked = rng.sample(facts, rng.randint(2, 4))
    return "\n\n" + rng.choice(EDIT_OPENERS) + " " + ", ".join(picked) + "."


def format_pretrain_text(subreddit: str, title: str, post: str) -> str:
    """A pretraining document: a post formatted like a query but WITHOUT the TL;DR part (the base model never
    sees summaries)."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}"


def _rng(seed: int, *keys) -> random.Random:
    return random.Random("/".join(str(k) for k in (seed,) + keys))


def make_post(seed: int, split: str, i: int, seen: set, post_words: Tuple[int, int] = GenConfig.post_words) -> dict:
    """Record + realisation of post i of `split` (independent of every other post: its own RNG stream)."""
    for attempt in range(100):
        rng = _rng(seed, split, i, attempt)
        pid = "t3_" + hashlib.md5(f"{seed}/{split}/{i}/{attempt}".encode()).hexdigest()[:10]
        rec = make_record(rng, pid)
        subreddit, title, post = realise_post(rec, rng, post_words)
        key = (title, post[:48])
        if key in seen or pid in seen:
            continue
        seen.add(key), seen.add(pid)
        rec.update(subreddit=subreddit, title=title, post=post, split=split)
        return rec
    raise RuntimeError("could not draw a unique post")


def calibrate_temperature(gaps: Sequence[float], target: float) -> float:
    """Bradley-Terry temperature T such that the mean of sigmoid(|gap| / T) over non-tied pairs is `target`."""
    g = [abs(x) for x in gaps if abs(x) > 1e-9]
    if not g:
        return 1.0

    def agree(t):
        return sum(1.0 / (1.0 + math.exp(-x / t)) for x in g) / len(g)
    lo, hi = 1e-3, 1e3
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if agree(mid) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def make_comparisons(seed: int, split: str, n: int, cfg: GenConfig, seen: set) -> Tuple[List[dict], List[dict]]:
    """Posts + pairs of summaries (not yet labelled). Returns (records, pairs, raw drafts)."""
    n_posts = max(1, math.ceil(n / cfg.cmp_per_post))
    recs = [make_post(seed, f"cmp_{split}", i, seen, cfg.post_words) for i in range(n_posts)]
    pols, wts = list(POLICY_WEIGHTS), list(POLICY_WEIGHTS.values())
    drafts = []
    for k in range(n):
        rng = _rng(seed, "cmp_pair", split, k)
        rec = recs[k // cfg.cmp_per_post]
        other = recs[(k // cfg.cmp_per_post + 1 + rng.randrange(max(1, n_posts - 1))) % n_posts] if n_posts > 1 else rec
        if rng.random() < 0.3:  # hard pairs: two human-like references (close scores)
            pa, pb = "ref", "ref"
        else:
            pa, pb = rng.choices(pols, wts, k=2)
        sa = policy_summary(pa, rec, rec["title"], rec["post"], other, rng, cfg)
        sb = policy_summary(pb, rec, rec["title"], rec["post"], other, rng, cfg)
        drafts.append(dict(rec=rec, pa=pa, pb=pb, sa=sa, sb=sb, k=k))
    return recs, drafts


def label_comparisons(drafts: List[dict], seed: int, split: str, temperature: float,
                      w: JudgeWeights = JudgeWeights()) -> Tuple[List[dict], dict]:
    rows, agree, n_nontie, n_tie, n_hard = [], 0, 0, 0, 0
    by_conf: Dict[int, List[int]] = {}
    scores: Dict[tuple, float] = {}  # speed: a rater round's sample is in 5 of its post's 15 pairs, scored once

    def gold(rec: dict, summary: str) -> float:
        key = (rec["id"], summary)
        if key not in scores:
            scores[key] = score_against_record(rec, summary, w)
        return scores[key]

    for d in drafts:
        rng = _rng(seed, "label", split, d["k"])
        rec = d["rec"]
        a, b = gold(rec, d["sa"]), gold(rec, d["sb"])
        worker = rng.randrange(24)
        t = temperature * (0.75 + 0.5 * (worker / 23))  # raters differ in how noisy they are
        # Bradley-Terry rater: the perceived gap is the true gap plus logistic noise of scale t, so
        # P(choice = 0) = sigmoid((a - b) / t)
        u = min(max(rng.random(), 1e-12), 1 - 1e-12)
        perceived = (a - b) + t * math.log(u / (1 - u))
        choice = 0 if perceived > 0 else 1
        # extra.confidence 1..9 like the real data: grows with the perceived gap (plus a little rater noise)
        conf = int(min(9, max(1, round(1 + 8 * math.tanh(abs(perceived) / (2.5 * t)) + rng.gauss(0, 0.7)))))
        n_hard += abs(a - b) < 0.5
        if abs(a - b) > 1e-9:
            n_nontie += 1
            agree += (choice == 0) == (a > b)
            by_conf.setdefault(conf, []).append(int((choice == 0) == (a > b)))
        else:
            n_tie += 1
        rows.append(dict(
            info=dict(id=rec["id"], post=rec["post"], title=rec["title"], subreddit=rec["subreddit"]),
            summaries=[dict(text=" " + d["sa"].strip(), policy=d["pa"], note=""),  # Detail 4: summaries start with a space
                       dict(text=" " + d["sb"].strip(), policy=d["pb"], note="")],
            choice=choice, worker=f"worker{worker:02d}", batch=f"batch{1 + d['k'] % 10}",
            split="train" if split == "train" else "valid1", extra=dict(confidence=conf)))
    stats = dict(label_agreement=agree / max(1, n_nontie), ties=n_tie, n=len(rows), hard_pairs=n_hard / max(1, len(rows)),
                 label_agreement_by_confidence={str(c): sum(v) / len(v) for c, v in sorted(by_conf.items())},
                 confidence_counts={str(c): len(v) for c, v in sorted(by_conf.items())})
    return rows, stats


def generate_data(cfg: GenConfig) -> dict:
    """All text data (no tokenizer needed). Returns dict of row lists + stats."""
    seen: set = set()
    seed = cfg.seed
    out: Dict[str, list] = {}
    records: List[dict] = []
    for split, n in (("train", cfg.n_sft_train), ("validation", cfg.n_sft_val), ("test", cfg.n_sft_test)):
        rows = []
        for i in range(n):
            rec = make_post(seed, f"sft_{split}", i, seen, cfg.post_words)
            ref = human_reference(rec, _rng(seed, "ref", split, i), cfg)
            rec["reference"] = ref
            records.append(rec)
            rows.append(dict(id=rec["id"], subreddit=rec["subreddit"], title=rec["title"], post=rec["post"], summary=ref))
        out[f"sft_{split}"] = rows
    drafts_all = {}
    for split, n in (("train", cfg.n_cmp_train), ("validation", cfg.n_cmp_val)):
        recs, drafts = make_comparisons(seed, split, n, cfg, seen)
        records += recs
        drafts_all[split] = drafts
    # calibrate the rater temperature on the training pairs' score gaps (one temperature for both splits)
    gaps = [score_against_record(d["rec"], d["sa"]) - score_against_record(d["rec"], d["sb"])
            for d in drafts_all["train"] or drafts_all["validation"]]
    temp = calibrate_temperature(gaps, cfg.target_agreement)
    stats: Dict[str, object] = dict(rater_temperature=temp)
    for split, drafts in drafts_all.items():
        rows, st = label_comparisons(drafts, seed, split, temp)
        out[f"comparisons_{split}"] = rows
        stats[f"comparisons_{split}"] = st
    pre = [make_post(seed, "pretrain", i, seen, cfg.post_words) for i in range(cfg.n_pretrain_posts)]
    out["pretrain_texts"] = [format_pretrain_text(r["subreddit"], r["title"], r["post"] + edit_note(r, _rng(seed, "edit", i), cfg))
                             for i, r in enumerate(pre)]
    out["records"] = records
    out["stats"] = stats
    return out


def summary_stats(data: dict, cfg: GenConfig) -> dict:
    """Statistics of the generated data by the gold judge (mean reference score, per-policy scores, win rates)."""
    recs = {r["id"]: r for r in data["records"]}
    ref_scores = [score_against_record(recs[r["id"]], r["summary"]) for r in data["sft_train"]]
    pol_scores: Dict[str, List[float]] = {}
    for row in data["comparisons_train"]:
        rec = recs[row["info"]["id"]]
        for s in row["summaries"]:
            pol_scores.setdefault(s["policy"], []).append(score_against_record(rec, s["text"]))
    # references vs. the concise all-facts summary on the SFT validation posts
    wins_ref = wins_concise = 0
    n_missing = n_irrelevant = 0
    for i, r in enumerate(data["sft_validation"] or data["sft_train"]):
        rec = recs[r["id"]]
        c = compose_summary(rec, _rng(cfg.seed, "concise", i), concise=True)
        a, b = score_against_record(rec, r["summary"]), score_against_record(rec, c)
        wins_ref += a > b + 1e-9
        wins_concise += b > a + 1e-9
    for r in data["sft_train"]:
        _, d = score_against_record(recs[r["id"]], r["summary"], details=True)
        full = JudgeWeights()
        n_missing += d["cover"] < sum(getattr(full, k) for k in SALIENT) - 1e-9
        n_irrelevant += d["irrelevant"] > 0
    nv = max(1, len(data["sft_validation"] or data["sft_train"]))
    n = max(1, len(data["sft_train"]))
    outcomes = [fact_outcomes(recs[r["id"]], r["summary"]) for r in data["sft_train"]]
    return dict(
        reference_fact_rates={k: {o: sum(x[k] == o for x in outcomes) / n for o in ("right", "wrong", "missing")}
                              for k in SALIENT},
        mean_reference_score=sum(ref_scores) / n, max_score=sum(getattr(JudgeWeights(), k) for k in SALIENT),
        reference_missing_fact_rate=n_missing / n, reference_irrelevant_rate=n_irrelevant / n,
        policy_mean_score={k: sum(v) / len(v) for k, v in sorted(pol_scores.items())},
        win_rate_reference_vs_concise_all_facts=wins_ref / nv, win_rate_concise_all_facts_vs_reference=wins_concise / nv,
        mean_post_words=sum(len(r["post"].split()) for r in data["sft_train"]) / n,
        mean_summary_words=sum(len(r["summary"].split()) for r in data["sft_train"]) / n,
    )


# =====================================================================================================
# 6. Tokenizer
# =====================================================================================================

def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str):
    """Byte-level BPE trained on the generated text; `<|endoftext|>` is id 0 and EOS; no pad token (Detail 3
    adds `[PAD]` later, in the same code as for Pythia)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    assert tok.token_to_id(EOS_TOKEN) == 0
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                 model_max_length=2048, clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


# =====================================================================================================
# 7. Tiny GPT-NeoX base models
# =====================================================================================================

# Steps matter more than they seem: a base model only learns to look things up in its context (the title's facts
# predicting the body's) after several hundred steps. Measured on base-s (lr 3e-3): the own title raised the
# log-probability of the post's first line over another post's title in 50% of posts at step 250 (no retrieval),
# 72% at 500, 82% at 750 (+3.7 nats), 80% at 1000 (+4.2 nats). Without it SFT cannot ground its summaries in the
# post (a base-m pretrained 400 steps gave an SFT model that preferred its own reference in 52% of posts).
# xl gets 1,200 steps: at 800 its 4.0M parameters ended barely below the 1.4M base (validation loss 0.536-0.543 against 0.552),
# at 1,200 0.523-0.529 (seeds 1-3). PPO's 3-seed mean rose 0.762 -> 0.827 and SFT's fell 0.445 -> 0.403, per-seed
# changes as large as the seed spread (docs/embedded_task.md; xl was named l before 2026-12-07).
# The sweep's three sizes s / m / l span the part of the size curve where this task still rewards size: SFT's win
# rate rises from 0.4M to 1.4M parameters (0.2 -> 0.45-0.5) and is flat from 1.4M to 4.0M (0.41 -> 0.40), where the
# references' mode caps it (docs/embedded_task.md, "Why SFT does not rise"). So m (0.78M, about the geometric middle of
# s and l) sits between them, l is the 1.4M model (named m before 2026-12-07) and the 4.0M model stays as xl, outside
# the sweep: it costs twice l's time for no gain in SFT. m pretrains at s's 3e-3: at 2e-3 its 1,000 steps ended above
# base-s (validation loss 0.575 against 0.568; task seed 1).
# s has two heads of 32 (not four of 16): the same 0.42M parameters, but with four 16-wide heads its summaries copied the
# narrator's age one year off or the duration in the wrong unit in 21-30% of posts (m and l, heads of 24 and 32: <= 1%),
# and its same-size RM could not check them, so PPO gained +0.127 +- 0.050 (sweep seeds 1-3). With heads of 32 the
# duration is copied right, SFT 0.41 / 0.14 / 0.43, PPO 0.615 / 0.570 / 0.755 (docs/embedded_task.md, 2026-12-07 night).
# m has three heads of 32 (not four of 24), so every size has 32-wide heads: with heads of 24 m's PPO ended at s's level
# (0.680 against 0.683, sweep seeds 1-3), with heads of 32 at 0.820 +- 0.007 (SFT 0.447 against 0.425), between s and
# l (0.915); the same 0.78M parameters, a shorter chain (docs/embedded_task.md, 2026-12-08).
MODEL_SIZES = {  # hidden, layers, heads, pretraining steps (of 8 x 256 tokens), learning rate
    "s": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, steps=1000, lr=3e-3),
    "m": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, steps=1000, lr=3e-3),
    "l": dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4, steps=1000, lr=2e-3),
    "xl": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, steps=1200, lr=2e-3),
}


def pick_num_threads(requested: int = 0) -> int:
    """Torch threads for pretraining: `requested` if > 0, else min(2, cores). A fixed number, never one read off the
    machine's load: the thread count changes the order of float reductions, and the same seed must give the same
    model on the same machine. (On a machine already busy with other jobs, pass --num_threads 1: two threads on
    oversubscribed cores were measured ~6x slower than one.)"""
    if requested > 0:
        return requested
    return min(2, os.cpu_count() or 1)


def padded_vocab_size(n_tokens: int, multiple: int = 64, spare: int = 8) -> int:
    """Embedding rows: the tokenizer size rounded up with spare rows (like Pythia's 50,304 > 50,277), so the
    `[PAD]` token fits without a resize (Detail 3)."""
    return int(math.ceil((n_tokens + spare) / multiple) * multiple)


def make_config(size: str, vocab_size: int, max_positions: int = 1024):
    from transformers import GPTNeoXConfig
    s = MODEL_SIZES[size]
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], intermediate_size=4 * s["hidden_size"],
        max_position_embeddings=max_positions, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        # Detail 7: dropout off in the config of every model
        hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, layer_norm_eps=1e-5, initializer_range=0.02)


def pack_tokens(tokenizer, texts: Sequence[str], block: int) -> "torch.Tensor":
    import torch
    ids: List[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def pretrain(size: str, tokenizer, texts: Sequence[str], out_dir: str, seed: int, steps: Optional[int] = None,
             batch_size: int = 8, block: int = 256, log=print, num_threads: int = 0, bf16: bool = False) -> dict:
    import torch
    from transformers import GPTNeoXForCausalLM
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    threads = pick_num_threads(num_threads)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = MODEL_SIZES[size]
    steps = steps or spec["steps"]
    cfg = make_config(size, padded_vocab_size(len(tokenizer)))
    model = GPTNeoXForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    data = pack_tokens(tokenizer, texts, block)
    n_val = max(4, min(64, len(data) // 20))
    val, train = data[:n_val], data[n_val:]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))

    def val_loss():
        model.eval()
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                ls = [model(input_ids=val[i:i + 16], labels=val[i:i + 16]).loss.item() for i in range(0, len(val), 16)]
        model.train()
        return sum(ls) / len(ls)
    losses = []
    v0 = val_loss()
    t0 = time.time()
    model.train()
    with Progress(TextColumn(f"pretrain base-{size}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()) as prog:
        task = prog.add_task("pretrain", total=steps, loss=float("nan"))
        perm = torch.randperm(len(train), generator=g)
        pos = 0
        for step in range(steps):
            if pos + batch_size > len(perm):
                perm, pos = torch.randperm(len(train), generator=g), 0
            x = train[perm[pos:pos + batch_size]]
            pos += batch_size
            # bf16: CPU autocast (fp32 weights and optimizer, bf16 matrix products), as the GPU runs' mixed precision
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            prog.update(task, advance=1, loss=sum(losses[-10:]) / len(losses[-10:]))
    secs = time.time() - t0
    v1 = val_loss()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = dict(size=size, n_params=n_params, steps=steps, batch_size=batch_size, block=block, lr=spec["lr"],
                train_tokens=steps * batch_size * block, first_loss=losses[0], final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
                val_loss_init=v0, val_loss=v1, seconds=secs, num_threads=threads, bf16=bf16, config=cfg.to_dict())
    log(f"base-{size}: {n_params / 1e6:.2f}M params, loss {losses[0]:.3f} -> {info['final_train_loss']:.3f}, "
        f"val {v0:.3f} -> {v1:.3f}, {secs:.0f}s")
    return info


# =====================================================================================================
# 8. Build (idempotent)
# =====================================================================================================

@dataclass
class Args:
    out_dir: str = "runs/task"
    """output folder of the task"""
    seed: int = 1
    sizes: str = "s,m,l"
    """comma-separated base model sizes to pretrain (s, m, l); empty for none"""
    n_sft_train: int = 6000
    n_sft_val: int = 500
    n_sft_test: int = 500
    n_cmp_train: int = 6000
    n_cmp_val: int = 1000
    n_pretrain_posts: int = 16000
    p_pretrain_edit: float = GenConfig.p_pretrain_edit
    """share of pretraining posts that end with an "EDIT:" restating some of their facts (`edit_note`)"""
    vocab_size: int = 3000
    pretrain_steps: int = 0
    """pretraining steps for every size (0 = the size's default)"""
    pretrain_batch_size: int = 8
    pretrain_block: int = 256
    target_agreement: float = 0.75
    num_threads: int = 0
    """torch threads for pretraining (0 = min(2, cores); 1 on a machine busy with other jobs)"""
    bf16: bool = False
    """pretrain under CPU bf16 autocast (the GPU runs' mixed precision; on an AVX512-BF16 CPU base-m pretrains 1.4x
    faster, but the pipeline only 5%: docs/embedded_task.md)"""
    force: bool = False
    """rebuild every part even when it exists with the same config"""


def _stamp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def build(args: Args, log=print) -> dict:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in MODEL_SIZES:
            raise ValueError(f"--sizes: unknown size {s!r} (choose from {sorted(MODEL_SIZES)})")
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    cfg = GenConfig(seed=args.seed, n_sft_train=args.n_sft_train, n_sft_val=args.n_sft_val, n_sft_test=args.n_sft_test,
                    n_cmp_train=args.n_cmp_train, n_cmp_val=args.n_cmp_val, n_pretrain_posts=args.n_pretrain_posts,
                    target_agreement=args.target_agreement, p_pretrain_edit=args.p_pretrain_edit)
    data_stamp = _stamp(dataclasses.asdict(cfg))
    task_path = os.path.join(out, "task.json")
    task = _read_json(task_path) or {}
    if task.get("data_stamp") != data_stamp:
        task = {}
    raw_files = [f"raw/sft_{s}.jsonl" for s in ("train", "validation", "test")] + \
        [f"raw/comparisons_{s}.jsonl" for s in ("train", "validation")] + ["gold/records.jsonl", "gold/pretrain_texts.jsonl"]
    have_data = task.get("data_stamp") == data_stamp and all(os.path.exists(os.path.join(out, f)) for f in raw_files)
    data = None
    if args.force or not have_data:
        t0 = time.time()
        data = generate_data(cfg)
        for s in ("train", "validation", "test"):
            write_jsonl(os.path.join(out, f"raw/sft_{s}.jsonl"), data[f"sft_{s}"])
        for s in ("train", "validation"):
            write_jsonl(os.path.join(out, f"raw/comparisons_{s}.jsonl"), data[f"comparisons_{s}"])
        write_jsonl(os.path.join(out, "gold/records.jsonl"), data["records"])
        write_jsonl(os.path.join(out, "gold/pretrain_texts.jsonl"), [{"text": t} for t in data["pretrain_texts"]])
        stats = dict(data["stats"])
        stats.update(summary_stats(data, cfg))
        task = dict(data_stamp=data_stamp, generator=dataclasses.asdict(cfg), judge_weights=dataclasses.asdict(JudgeWeights()),
                    stats=stats, counts={k: len(v) for k, v in data.items() if isinstance(v, list)},
                    timings=dict(data_seconds=time.time() - t0))
        _write_json(task_path, task)
        log(f"data: {task['counts']} in {task['timings']['data_seconds']:.1f}s")
    else:
        log("data: up to date")

    # tokenizer
    tok_dir = os.path.join(out, "tokenizer")
    tok_stamp = _stamp([data_stamp, args.vocab_size])
    if args.force or task.get("tokenizer_stamp") != tok_stamp or not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        t0 = time.time()
        if data is None:
            data = _load_texts(out)
        texts = data["pretrain_texts"] + [format_query(r["subreddit"], r["title"], r["post"]) + " " + r["summary"]
                                          for s in ("train", "validation", "test") for r in data[f"sft_{s}"]]
        texts += [s["text"] for r in data["comparisons_train"] for s in r["summaries"]]
        tok = train_tokenizer(texts, args.vocab_size, tok_dir)
        task["tokenizer_stamp"] = tok_stamp
        task.setdefault("timings", {})["tokenizer_seconds"] = time.time() - t0
        task["stats"].update(token_stats(out, tok))
        _write_json(task_path, task)
        log(f"tokenizer: {len(tok)} tokens in {task['timings']['tokenizer_seconds']:.1f}s; "
            f"queries <= 256 tokens: {task['stats']['query_fits_256']:.4f}")
    else:
        log("tokenizer: up to date")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)

    base = task.setdefault("base_models", {})
    for s in sizes:
        mdir = os.path.join(out, f"base-{s}")
        # content hashes: a rebuilt but identical tokenizer / corpus does not force a new pretraining run
        stamp = _stamp([_file_hash(os.path.join(tok_dir, "tokenizer.json")),
                        _file_hash(os.path.join(out, "gold/pretrain_texts.jsonl")), args.seed, MODEL_SIZES[s],
                        args.pretrain_steps, args.pretrain_batch_size, args.pretrain_block]
                       + (["bf16"] if args.bf16 else []))  # fp32 stamps stay those of earlier builds
        prev = _read_json(os.path.join(mdir, "pretrain.json")) or {}
        if not args.force and prev.get("stamp") == stamp and os.path.exists(os.path.join(mdir, "model.safetensors")):
            base[s] = prev
            log(f"base-{s}: up to date")
            continue
        texts = [json.loads(line)["text"] for line in open(os.path.join(out, "gold/pretrain_texts.jsonl"), encoding="utf-8")]
        # one pretraining seed for every size, whichever other sizes this call builds: `--sizes m` and `--sizes s,m,l`
        # give the same base-m, so a sweep's shared task holds the quickstart's base models of the same seed
        info = pretrain(s, tok, texts, mdir, seed=args.seed * 1000, steps=args.pretrain_steps or None,
                        batch_size=args.pretrain_batch_size, block=args.pretrain_block, log=log,
                        num_threads=args.num_threads, bf16=args.bf16)
        info["stamp"] = stamp
        info.pop("config")
        base[s] = info
        _write_json(os.path.join(mdir, "pretrain.json"), info)
        _write_json(task_path, task)
    _write_json(task_path, task)
    return task


def _load_texts(out: str) -> dict:
    d = {f"sft_{s}": read_jsonl(os.path.join(out, f"raw/sft_{s}.jsonl")) for s in ("train", "validation", "test")}
    d["comparisons_train"] = read_jsonl(os.path.join(out, "raw/comparisons_train.jsonl"))
    d["pretrain_texts"] = [r["text"] for r in read_jsonl(os.path.join(out, "gold/pretrain_texts.jsonl"))]
    return d


def token_stats(out: str, tok) -> dict:
    rows = read_jsonl(os.path.join(out, "raw/sft_train.jsonl"))[:2000]
    q = [len(x) for x in tok([format_query(r["subreddit"], r["title"], r["post"]) for r in rows],
                             add_special_tokens=False)["input_ids"]]
    p = [len(x) for x in tok([r["post"] for r in rows], add_special_tokens=False)["input_ids"]]
    sm = [len(x) + 1 for x in tok([" " + r["summary"] for r in rows], add_special_tokens=False)["input_ids"]]
    n = max(1, len(rows))
    return dict(vocab=len(tok), mean_query_tokens=sum(q) / n, max_query_tokens=max(q, default=0),
                query_fits_256=sum(x <= 256 for x in q) / n, mean_post_tokens=sum(p) / n,
                min_post_tokens=min(p, default=0), max_post_tokens=max(p, default=0),
                mean_reference_tokens_with_eos=sum(sm) / n, max_reference_tokens_with_eos=max(sm, default=0),
                reference_fits_53=sum(x <= 53 for x in sm) / n)


def main():
    import tyro
    args = tyro.cli(Args, use_underscores=True)
    t0 = time.time()
    task = build(args)
    task.setdefault("timings", {})["last_build_seconds"] = time.time() - t0
    _write_json(os.path.join(args.out_dir, "task.json"), task)
    st = task["stats"]
    print(f"label agreement (train) {st['comparisons_train']['label_agreement']:.3f}; mean reference score "
          f"{st['mean_reference_score']:.2f} / {st['max_score']:.2f}; wrote {os.path.join(args.out_dir, 'task.json')}")


if __name__ == "__main__":
    main()
