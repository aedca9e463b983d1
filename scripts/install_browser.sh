#!/usr/bin/env bash
# Headless Chromium + its WebDriver for the page test (python_tests/serve/test_page.py,
# through selenium). Debian/Ubuntu, as root. The test skips cleanly without them.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
chromedriver --version
