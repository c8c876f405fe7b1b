"""The open utterance: its audio window, the words that became stable, its partials and its final."""

from __future__ import annotations

import itertools
import logging

import numpy as np

from .engine import Transcript
from .events import Final, Partial, Word
from .frames import SAMPLE_RATE, int16_to_float
from .gate import UtteranceAudio, UtteranceEnd
from .rules import PUNCTUATION, WHISPER, TextRules, bare, doubtful, guessed, loop, looping, tail_guesses

log = logging.getLogger(__name__)

_PROMPT_CHARS = 200
_PAUSING_MS = 90
_CHECK_EVERY = 2  # greedy partials between two decoded at the final's beam (the only ones that make words stable)

def _agreed(a: list[str], b: list[str]) -> int:
    """Length of the common prefix of two word lists, ignoring case and punctuation."""
    n = 0
    for x, y in zip(a, b):
        if bare(x) != bare(y):
            break
        n += 1
    return n


def _after(stable: str, text: str) -> str | None:
    """What `text` says after `stable` when it begins with it, comparing letters and digits only
    (case, spaces and punctuation aside); None when it does not begin with it.

    Character-wise, because a decode made to begin with the stable words may run on inside the last
    one: stable "... peppered flower", decode "... peppered, flower-fattened sauce".
    """
    key = [c.lower() for c in stable if c.isalnum()]
    i = j = 0
    while j < len(key) and i < len(text):
        if text[i].isalnum():
            if text[i].lower() != key[j]:
                return None
            j += 1
        i += 1
    if j < len(key):
        return None
    if stable and stable[-1] in PUNCTUATION:  # the stable word's punctuation stands: "aligner." then ", but" is " but"
        while i < len(text) and text[i] in PUNCTUATION:
            i += 1
    return text[i:]


def _letters(word: str) -> int:
    return sum(c.isalnum() for c in word)


class UtteranceStream:
    """The open utterance: its audio so far and the partials published for it.

    Stabilisation is LocalAgreement-2 over decodes of the utterance's window: a word becomes stable
    once two consecutive partials agree on it, it is not the newest word of the later one, and the
    later one heard at least a second of audio after it. Later decodes, the final's included, are
    made to begin with the stable words (the decoder's prefix), so a stable word is never retracted.

    The window is the whole utterance until it is longer than `max_window_s`; then the audio of
    stable words is cut off its front at a pause between two of them (a sentence end if there is
    one), and those words become the decoder's prompt instead. Cutting sooner cost accuracy on the
    dev corpus (whole-utterance decodes hear more), so short utterances are always decoded whole.
    """

    def __init__(self, utt: int, start: int, partial_interval_s: float, context: str = "",
                 max_window_s: float = 1e9, rules: TextRules = WHISPER, stable_after_s: float = 1.0) -> None:
        self.utt = utt
        self._settle_s = stable_after_s
        self._rules = rules
        self.start = start
        self._context = context
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._interval = round(partial_interval_s * SAMPLE_RATE)
        self._max_window = round(max_window_s * SAMPLE_RATE)
        self._decoded_at = 0  # samples of audio the last partial covered
        self.rev = 0
        self.base = 0
        """Samples cut off the front of the utterance: decodes hear its audio from here on."""
        self._done: list[str] = []  # stable words whose audio was cut off
        self._done_words: list[Word] = []  # their timings, in seconds into the utterance
        self.committed: list[str] = []
        """Stable words still in the window: every later decode of this utterance begins with them."""
        self._pending: list[str] = []  # the last partial's words after the stable ones
        self._greedy_since_check = 0
        self._unvoiced_ms = 0

    @property
    def samples(self) -> int:
        """Samples of audio received so far."""
        return self._samples

    @property
    def stable(self) -> str:
        """All the stable words as text, those cut off the window included."""
        return " ".join(self._done + self.committed)

    @property
    def prefix(self) -> str:
        """The stable words in the window: the text every later decode must begin with.

        Without a sentence end after the last word: given "... aligner." tiny.en mostly stops
        there, and the words said after it were lost (in partials and the final alike).
        """
        return " ".join(self.committed).rstrip(".!?…")

    @property
    def prompt(self) -> str:
        """What the decoder is told came before the window: context, then the words cut off it."""
        return " ".join(t for t in (self._context, *self._done) if t)[-_PROMPT_CHARS:]

    def keeps_stable(self, t: Transcript) -> bool:
        """True when a decode begins with every stable word in the window (a final must)."""
        return _after(self.prefix, t.text) is not None

    def insert(self, audio: UtteranceAudio) -> None:
        """Append the next piece of the utterance's audio."""
        self._chunks.append(audio.pcm)
        self._samples += len(audio.pcm)
        self._unvoiced_ms = audio.unvoiced_ms

    def partial_due(self) -> bool:
        """True when enough new audio has come since the last partial, and speech is not pausing:
        a pause brings no new words, and a partial decode begun there would delay the final's."""
        return self._samples - self._decoded_at >= self._interval and self._unvoiced_ms < _PAUSING_MS

    def audio(self, until: int | None = None) -> np.ndarray:
        """The window's audio as float32, up to stream sample `until` when given."""
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        pcm = self._chunks[0] if self._chunks else np.zeros(0, dtype=np.int16)
        if until is not None:
            pcm = pcm[:max(0, until - self.start - self.base)]
        return int16_to_float(pcm)

    def wants_check(self) -> bool:
        """True when the next partial should be decoded as the final would be: there are words waiting
        to become stable and _CHECK_EVERY greedy partials have come since the last check, or the
        window is past asr.max_window_s (it is cut only where a check places the words)."""
        if self._samples - self.base > self._max_window:
            return True
        return bool(self._pending) and self._greedy_since_check >= _CHECK_EVERY

    def partial(self, t: Transcript, covered: int, checked: bool = True) -> Partial:
        """The partial event for a decode of the window up to the utterance's `covered` samples.

        Words become stable only on a `checked` decode (decoded as the final will be): a greedy
        decode's words bound the final to greedy mistakes ("How do you" where beam 5 hears "Had he").
        """
        self._decoded_at = covered
        self.rev += 1
        self._greedy_since_check = 0 if checked else self._greedy_since_check + 1
        # Punctuation alone is no word: greedy decodes can loop on " . . ." and must not make it stable.
        timed = [w for w in t.words if _letters(w.word)]
        said = [w.word for w in timed] if timed else [w for w in t.text.split() if _letters(w)]
        # Past the stable words by the same letter-wise rule as the final, so a word that ran on
        # ("flower" -> "flower-fattened") is neither dropped here nor doubled there.
        rest = _after(" ".join(self.committed), " ".join(said))
        # (a stable word's own punctuation, ". Forest" after stable "Montreal", is no word either)
        # A decode that does not begin with the stable words changes nothing (the final will be bound
        # to them).
        hypothesis = [w for w in rest.split() if _letters(w)] if rest is not None else list(self._pending)
        skip = len(said) - len(hypothesis)
        looped = loop(hypothesis, self._rules)
        if looped:  # a loop's repeats are never shown or made stable ("Hello. Hello. Hello. …")
            hypothesis = hypothesis[:looped[0]]
        agreed = _agreed(self._pending, hypothesis[:-1]) if checked and rest is not None else 0
        if t.no_speech_prob > self._rules.max_no_speech:
            # Whisper doubts there is speech at all ("You" on a noise burst): show nothing new, and make
            # nothing stable, which would force it into the final past the no-speech check there.
            hypothesis, agreed = [], 0
        elif t.avg_logprob < self._rules.min_logprob:
            # Whisper's own doubt: a guess made twice is still a guess (greedy partials said "I'm …"
            # or "I don't know" to breaths, p ~0.1), and once stable it is forced into the final.
            agreed = 0
        if timed:  # and only words the decoder heard at least stable_after_s of audio after
            settled = (covered - self.base) / SAMPLE_RATE - self._settle_s
            agreed = min(agreed, sum(1 for _ in itertools.takewhile(lambda w: w.end <= settled, timed[skip:])))
        self.committed += hypothesis[:agreed]
        self._pending = hypothesis[agreed:]
        if covered - self.base > self._max_window:
            if self.committed and timed and rest is not None and checked:
                # Cut where a free check places the words: a greedy partial's word times can be off by
                # a word, and a decode made to begin with wrong stable words stretches them over speech
                # nobody transcribed; cuts there lost the audio of words not yet stable ("dial 500 to
                # attempt an [20 words] internet"; "I needed to die. [19 words] Chicago also").
                self._trim(timed)
            elif not self.committed and t.no_speech_prob > self._rules.max_no_speech:
                # Noise the gate let through (music, a long rumble) with nothing stable to cut at: what
                # Whisper hears no speech in is not kept past the window, or decodes would grow to the
                # gate's 60 s limit. Half a window stays, so speech just beginning is not cut into.
                self._cut(covered - self.base - self._max_window // 2)
                log.debug("utterance %d: no speech heard in the window; it now begins at %.1f s",
                          self.utt, self.base / SAMPLE_RATE)
        unstable = " ".join(self._pending)
        return Partial(self.utt, self.rev, self.start / SAMPLE_RATE, (self.start + covered) / SAMPLE_RATE,
                       stable=self.stable, unstable=unstable, text=" ".join(self._done + self.committed + self._pending))

    def _trim(self, timed: list[Word]) -> None:
        """Cut the audio of stable words off the window's front between two of them (at the sentence
        end with the widest pause after it, else at the widest pause); the words go to the prompt."""
        ends = list(itertools.accumulate(_letters(w) for w in self.committed))  # letters up to each stable word
        cuts = []  # (sentence end, pause, window words before the cut, stable words before it)
        letters = 0
        for i, (word, after) in enumerate(zip(timed, timed[1:])):
            letters += _letters(word.word)
            if letters in ends:  # else not between two stable words (Whisper may split words differently)
                n = len(ends) - ends[::-1].index(letters)
                cuts.append((word.word.endswith((".", "?", "!")), after.start - word.end, i + 1, n))
        if not cuts:
            return
        _, _, k, n = max(cuts)
        offset = self.base / SAMPLE_RATE
        cut = round((timed[k - 1].end + timed[k].start) / 2 * SAMPLE_RATE)
        self._done += self.committed[:n]
        self._done_words += [Word(w.word, w.start + offset, w.end + offset, w.p) for w in timed[:k]]
        self.committed = self.committed[n:]
        self._cut(cut)
        log.debug("utterance %d: %.1f s of audio (%d stable words) cut off the window, which now begins at %.1f s",
                  self.utt, cut / SAMPLE_RATE, n, self.base / SAMPLE_RATE)

    def _cut(self, samples: int) -> None:
        self.base += samples
        self._chunks = [np.concatenate(self._chunks)[samples:]]

    def final(self, t: Transcript, end: UtteranceEnd, latency: float) -> Final:
        """The final event for the decode of the window, less what the text rules cut (rules.py)."""
        rules = self._rules
        flags = []
        if not t.text:
            flags.append("empty")
        elif doubtful(t.avg_logprob, t.compression_ratio, t.no_speech_prob, rules):
            flags.append("possible_hallucination")
        # Stable words are never cut: they end asr.stable_after_s or more before the voiced end.
        n = len(t.words)
        cut = t.without(n - tail_guesses(t.words, (end.end - self.start - self.base) / SAMPLE_RATE, rules), n)
        looped = loop([w.word for w in cut.words], rules)
        if looped and looped[0] < len(self.committed):
            looped = None
        if looped or looping([*t.text.split(), *t.unheard], rules):
            flags.append("repetition")
        if end.reason != "silence":
            flags.append(end.reason)
        if t.origin == "fallback":
            flags.append("fallback")
        t = cut.without(*looped) if looped else cut
        if t.unheard:
            log.debug("utterance %d: left out %r (after the audio, a tail or a loop)", self.utt, " ".join(t.unheard))
        offset = self.start / SAMPLE_RATE
        base = self.base / SAMPLE_RATE
        words = tuple(Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), round(w.p, 3))
                      for w in (*self._done_words, *(Word(w.word, w.start + base, w.end + base, w.p) for w in t.words)))
        if not self.stable and guessed(words, t.no_speech_prob, "repetition" in flags, rules):
            log.info("utterance %d: withheld %r (word p %s, no-speech p %.2f, avg log-p %.2f)", self.utt, t.text,
                     [round(w.p, 3) for w in words], t.no_speech_prob, t.avg_logprob)
            return Final(self.utt, offset, end.end / SAMPLE_RATE, "", (), t.language, latency, (*flags, "withheld"))
        committed = " ".join(self.committed)
        rest = _after(committed, t.text)
        if rest is not None:
            said = (committed + rest).strip()
        elif t.origin == "remote":  # an inference server heard the stable words otherwise: its text stands
            said = t.text
            flags.append("unbound")
        else:
            said = " ".join(self.committed + t.text.split())
        text = " ".join([*self._done, said]).strip()
        return Final(self.utt, offset, end.end / SAMPLE_RATE, text, words, t.language, latency, tuple(flags))
