"""The open utterance: when it wants a partial or a check, what each partial shows, where its window
is cut, and its final (stabilisation in stable.py, the audio window in window.py, rules in rules.py)."""

from __future__ import annotations

import logging

import numpy as np

from .engine import Transcript
from .events import Final, Partial, Word
from .frames import SAMPLE_RATE
from .gate import UtteranceAudio, UtteranceEnd
from .rules import WHISPER, TextRules, doubtful, guessed, looping, tail_guesses, trusted
from .stable import StableWords, after, holding, spoken
from .window import AudioWindow

log = logging.getLogger(__name__)

_PAUSING_MS = 90
# Most of the model thread's time partials may take: the next waits for new audio worth the last one's
# decode time over this, so a slower model (base) spaces its partials instead of falling behind.
# 0.5 cost tiny.en 12 words on replay tune (0.027 -> 0.036): its checks came later.
_PARTIAL_DUTY = 1.0
_CHECK_EVERY = 2  # greedy partials between two decoded at the final's beam (the only ones that make words stable)
_WHOLE = 30 * SAMPLE_RATE  # Whisper's window: an utterance up to this long is heard in one encoder pass


class UtteranceStream:
    """The open utterance: its audio window, its stable words and the partials published for it.

    The window is the whole utterance until it is longer than `max_window_s`; then the audio of
    stable words is cut off its front at a pause between two of them (a sentence end if there is
    one), and those words become the decoder's prompt instead. Cutting sooner cost accuracy on the
    dev corpus (whole-utterance decodes hear more), so short utterances are always decoded whole.
    """

    def __init__(self, utt: int, start: int, partial_interval_s: float, context: str = "",
                 max_window_s: float = 1e9, rules: TextRules = WHISPER, stable_after_s: float = 1.0,
                 stable_from_s: float = 0.0, partial_share: float = 0.0, first_partial_s: float | None = None,
                 settles: bool = True,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> None:
        self.utt = utt
        self._log = logger
        # False under asr.task = translate: a translation of more audio may reword or reorder what a
        # translation of less said ("I feel it" -> "I'm sorry"), so no prefix of one is settled, and
        # base's checks sometimes transcribed instead: Spanish stable words bound an English final.
        self._settles = settles
        self._rules = rules
        self.window = AudioWindow(start)
        self.words = StableWords(context, rules, stable_after_s, stable_from_s, logger)
        self._interval = round(partial_interval_s * SAMPLE_RATE)
        self._first = self._interval if first_partial_s is None else round(first_partial_s * SAMPLE_RATE)
        self._share = partial_share
        self._max_window = round(max_window_s * SAMPLE_RATE)
        self._decoded_at = 0  # samples of audio the last partial covered
        self._cost = 0  # samples of new audio the last partial's decode time asks for (_PARTIAL_DUTY)
        self.rev = 0
        self._shown = False  # a partial has had words: spaced by the interval from then on
        self._greedy_since_check = 0
        self._unvoiced_ms = 0
        self._noise_cut = False  # the window was cut at no stable word: what Whisper heard no speech in

    @property
    def start(self) -> int:
        """Stream sample at which the utterance began."""
        return self.window.start

    @property
    def samples(self) -> int:
        """Samples of audio received so far."""
        return self.window.samples

    @property
    def voiced_end(self) -> int:
        """Stream sample after the last voiced frame received so far."""
        return self.start + self.samples - self._unvoiced_ms * SAMPLE_RATE // 1000

    @property
    def stable(self) -> str:
        """All the stable words as text, those cut off the window included."""
        return self.words.text

    @property
    def prefix(self) -> str:
        """The text every later decode must begin with (StableWords.prefix)."""
        return self.words.prefix

    @property
    def partial_prefix(self) -> str:
        """The prefix a partial or check is decoded with (StableWords.partial_prefix)."""
        return self.words.partial_prefix

    @property
    def prompt(self) -> str:
        """What the decoder is told came before the window (StableWords.prompt)."""
        return self.words.prompt

    def keeps_stable(self, t: Transcript, whole: bool = False) -> bool:
        """True when a decode begins with every stable word in the window (a bound final must), those
        cut off it included for a decode of the `whole` utterance."""
        return self.words.kept_by(t.text, cut_off=whole)

    def trusted(self, t: Transcript, looped: bool | None = None) -> bool:
        """rules.trusted for a decode of this utterance, with its model's rules."""
        return trusted(t.text, t.avg_logprob, t.compression_ratio, t.no_speech_prob, self._rules, looped)

    def fits_whole(self, until: int) -> bool:
        """True when the window was cut at stable words and the utterance up to stream sample `until`
        fits Whisper's window: its final may then hear all of it, as the naive decoder would.

        After a cut the window's decode hears only the rest, with the words cut off as its prompt;
        at the end of speech that made tiny.en go on "… return to the conference. Thank you for
        watching. Thanks for watching." where the whole 17 s of the same speech decode cleanly.
        """
        return bool(self.words.done) and not self._noise_cut and until - self.start <= _WHOLE

    def span(self, until: int, whole: bool) -> int:
        """Samples a final's decode up to stream sample `until` hears: the `whole` utterance's, or the window's."""
        return until - self.start - (0 if whole else self.window.base)

    def whole(self, until: int) -> tuple[np.ndarray, str]:
        """The whole utterance's audio up to stream sample `until`, and the prompt for it."""
        return self.window.audio(until, whole=True), self.words.context

    def uncut(self) -> None:
        """Take a decode of the whole utterance as the final's: the window is all of it again."""
        self.window.uncut()
        self.words.uncut()

    def insert(self, audio: UtteranceAudio) -> None:
        """Append the next piece of the utterance's audio."""
        self.window.insert(audio.pcm, audio.unvoiced_ms)
        self._unvoiced_ms = audio.unvoiced_ms

    def partial_due(self) -> bool:
        """True when enough new audio has come since the last partial, and speech is not pausing:
        a pause brings no new words, and a partial decode begun there would delay the final's.

        Enough is the largest of the interval (asr.first_partial_s until a partial has had words: a
        viewer waits for them, and the first decode, of little more than the preroll, often has none),
        a share of the window (each partial decodes all of it, so at a fixed interval a long
        utterance's partials took ever more of the one model thread: replay tune, a third fewer partial
        seconds at 0.1, one word more; held-out and dev unchanged) and what the last partial's decode
        cost (_PARTIAL_DUTY).
        """
        due = max(self._interval if self._shown else self._first, round(self._share * self.window.length), self._cost)
        return self.samples - self._decoded_at >= due and self._unvoiced_ms < _PAUSING_MS

    def audio(self, until: int | None = None) -> np.ndarray:
        """The window's audio as float32, up to stream sample `until` when given."""
        return self.window.audio(until)

    def wants_check(self) -> bool:
        """True when the next partial should be decoded as the final would be: there are words waiting
        to become stable and _CHECK_EVERY greedy partials have come since the last check, or the
        window is past asr.max_window_s (it is cut only where a check places the words). Never for a
        stream whose words do not settle."""
        if not self._settles:
            return False
        if self.window.length > self._max_window:
            return True
        return bool(self.words.pending) and self._greedy_since_check >= _CHECK_EVERY

    def partial(self, t: Transcript, covered: int, checked: bool = True) -> Partial:
        """The partial event for a decode of the window up to the utterance's `covered` samples;
        words become stable only on a `checked` decode (decoded as the final will be), and never in a
        stream whose words do not settle (with asr.partial_beam_size at the final's, every partial is
        checked)."""
        checked = checked and self._settles
        self._decoded_at = covered
        self._cost = round(t.decode_seconds / _PARTIAL_DUTY * SAMPLE_RATE)
        self.rev += 1
        self._greedy_since_check = 0 if checked else self._greedy_since_check + 1
        window = self.window
        began = self.words.hear(t, (covered - window.base) / SAMPLE_RATE, checked)
        if covered - window.base > self._max_window:
            timed = spoken(t)
            if self.words.committed and timed and began and checked:
                # Cut where a check places the words: a greedy partial's word times can be off by a
                # word, and a decode made to begin with wrong stable words stretches them over speech
                # nobody transcribed; cuts there lost the audio of words not yet stable ("dial 500 to
                # attempt an [20 words] internet"; "I needed to die. [19 words] Chicago also").
                kept = len(self.words.committed)
                # Only in a pause the gate heard, even past Whisper's 30 s (a decode then hears the rest
                # in a second pass): base's checks stuck on a stable word ("VoiceOver" for Whisper's
                # "VoiceOverIP") placed the words at the window's end, and a cut by those times at 30 s
                # took 25 s of speech off the window.
                cut = self.words.cut_point(timed, window.offset, window.pause_in)
                if cut is not None:
                    window.cut(round(cut * SAMPLE_RATE))
                    self._log.debug("utterance %d: %.1f s of audio (%d stable words) cut off the window, which "
                                    "now begins at %.1f s", self.utt, cut, kept - len(self.words.committed),
                                    window.offset)
            elif not self.words.committed and self._silent(t, timed):
                # Noise the gate let through (music, a long rumble) with nothing stable to cut at: what
                # Whisper hears no speech in is not kept past the window, or decodes would grow to the
                # gate's 60 s limit. Half a window stays, so speech just beginning is not cut into.
                window.cut(covered - window.base - self._max_window // 2)
                self._noise_cut = True
                self._log.debug("utterance %d: no speech heard in the window; it now begins at %.1f s",
                                self.utt, window.offset)
        done, committed, pending = self.words.done, self.words.committed, self.words.pending
        self._shown = self._shown or bool(done or committed or pending)
        return Partial(self.utt, self.rev, self.start / SAMPLE_RATE, (self.start + covered) / SAMPLE_RATE,
                       stable=self.stable, unstable=" ".join(pending), text=" ".join(done + committed + pending))

    def _silent(self, t: Transcript, timed: list[Word]) -> bool:
        """Whisper's own test for a window with no speech: no-speech probability above its threshold and,
        if any word came out, those words improbable. On the no-speech probability alone, a
        conversation's window was cut after "Hello." and 54 of its 81 words were lost."""
        rules = self._rules
        return t.no_speech_prob > rules.max_no_speech and (not timed or t.avg_logprob < rules.min_logprob)

    def _trimmed(self, t: Transcript, end: UtteranceEnd, bind: bool) -> tuple[Transcript, bool, bool]:
        """What final() keeps of a decode of the window: t less the tail the decoder ran on into and
        every loop after the stable words; whether a loop was cut; whether t stands free of the
        stable words (a server's, or unbound, that does not begin with them)."""
        rules = self._rules
        free = (t.origin == "remote" or not bind) and after(" ".join(self.words.committed), t.text) is None
        # Stable words a final begins with are never cut: had the tail rule cut the last one, the final
        # would have said the stable words and then the whole decode again.
        n, held = len(t.words), 0 if free else holding(t.words, self.words.committed)
        tail = min(tail_guesses(t.words, (end.end - self.start) / SAMPLE_RATE - self.window.offset, rules), n - held)
        # Every loop after the stable words is cut back to one saying, one after another: a decode
        # bound to all that was said went "… Thank you. Thank you. Thank you. Bye bye." and "Bye bye."
        # forty times more. Found in the decode as Whisper wrote it, before the tail was cut.
        kept, looped = t.without(n - tail, n).unlooped(rules, held, written=[*(w.word for w in t.words), *t.unheard])
        return kept, looped, free

    def loops(self, t: Transcript, end: UtteranceEnd, bind: bool = True) -> bool:
        """True when final() would cut a loop out of this decode of the window."""
        return self._trimmed(t, end, bind)[1]

    def final(self, t: Transcript, end: UtteranceEnd, latency: float, bind: bool = True) -> Final:
        """The final event for the decode of the window, less what the text rules cut (rules.py).
        Unless `bind` (asr.bind_finals) is in force, a local decode that does not begin with the stable
        words stands, as a server's always does, flagged unbound."""
        rules = self._rules
        flags = []
        if not t.text:
            flags.append("empty")
        elif doubtful(t.avg_logprob, t.compression_ratio, t.no_speech_prob, rules):
            flags.append("possible_hallucination")
        committed = " ".join(self.words.committed)
        kept, looped, free = self._trimmed(t, end, bind)
        if looped or looping([*t.text.split(), *t.unheard], rules):  # the text: a decode may lack word times
            flags.append("repetition")
        if end.reason in ("max_length", "end_of_stream"):  # a pause did not end it
            flags.append(end.reason)
        if t.origin == "fallback":
            flags.append("fallback")
        t = kept
        if t.unheard:
            self._log.debug("utterance %d: left out %r (after the audio, a tail or a loop)", self.utt,
                            " ".join(t.unheard))
        offset = self.start / SAMPLE_RATE
        base = self.window.offset
        in_window = (Word(w.word, w.start + base, w.end + base, w.p) for w in t.words)
        words = tuple(Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), round(w.p, 3))
                      for w in (*self.words.done_words, *in_window))
        if not self.stable and guessed(words, t.no_speech_prob, "repetition" in flags, rules):
            self._log.info("utterance %d: withheld %r (word p %s, no-speech p %.2f, avg log-p %.2f)", self.utt,
                           t.text, [round(w.p, 3) for w in words], t.no_speech_prob, t.avg_logprob)
            return Final(self.utt, offset, end.end / SAMPLE_RATE, "", (), t.language, latency, (*flags, "withheld"))
        rest = after(committed, t.text)
        if rest is not None:
            said = (committed + rest).strip()
        elif free:  # the decode heard the stable words otherwise: its text stands
            said = t.text
            flags.append("unbound")
        else:
            said = " ".join(self.words.committed + t.text.split())
        text = " ".join([*self.words.done, said]).strip()
        return Final(self.utt, offset, end.end / SAMPLE_RATE, text, words, t.language, latency, tuple(flags))
