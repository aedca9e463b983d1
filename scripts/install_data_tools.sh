#!/usr/bin/env bash
# System tools the offline dataset builders (calm_fast/data/) call. The builders never
# install anything themselves; they check for these and say which package is missing.
# Debian/Ubuntu, as root.
set -euo pipefail
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
  fortunes fortunes-min bible-kjv \
  fluidsynth fluid-soundfont-gm mma
