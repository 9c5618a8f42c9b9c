#!/usr/bin/env bash
# Checks that the results page renders: opens it in headless Chromium,
# takes a screenshot and fails if the page is blank, lacks the timeline
# pictures, or logged a script error. Used by `make test` after `make run`.
#
# Usage: tools/check-html.sh [PAGE] [SCREENSHOT]
set -u
page=${1:-reports/index.html}
shot=${2:-reports/index.png}
fail() { echo "check-html: $*" >&2; exit 1; }

[ -f "$page" ] || fail "$page does not exist (run make run first)"
command -v chromium >/dev/null || fail "chromium is not installed (make deps installs it)"
abs=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
profile=$(mktemp -d /tmp/pgfault-chromium-XXXXXX)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (this machine has none) and out
# of the user's profile.
flags=(--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking
    --disable-component-update --disable-sync --disable-quic --hide-scrollbars
    --user-data-dir="$profile")

timeout 90 chromium "${flags[@]}" --enable-logging=stderr --v=0 --window-size=1280,1600 \
    --screenshot="$shot" "file://$abs" >"$profile/shot.log" 2>&1 ||
    fail "chromium could not take a screenshot: $(tail -3 "$profile/shot.log")"
[ -s "$shot" ] || fail "no screenshot written"
if grep -E 'Uncaught|SyntaxError|:ERROR:CONSOLE' "$profile/shot.log" >&2; then
    fail "the page logged a script error"
fi

dom=$(timeout 90 chromium "${flags[@]}" --dump-dom "file://$abs" 2>/dev/null) ||
    fail "chromium could not load the page"
svgs=$(grep -o '<svg' <<<"$dom" | wc -l)
rows=$(grep -o '<tr class="tl">' <<<"$dom" | wc -l)
[ "$svgs" -gt 0 ] || fail "the rendered page has no timeline (svg)"
[ "$svgs" -eq "$rows" ] || fail "$rows cases but $svgs timelines"

# Blank check: share of pixels that are not white in a scaled-down copy.
ink=$(pngtopnm "$shot" 2>/dev/null | pamscale -width 320 2>/dev/null | pnmtoplainpnm 2>/dev/null |
    awk 'NR == 2 { w = $1; h = $2; next } NR <= 3 { next }
         { for (i = 1; i <= NF; i++) { v[n++ % 3] = $i; if (n % 3 == 0) { t++; if (v[0] < 240 || v[1] < 240 || v[2] < 240) ink++ } } }
         END { if (t) printf "%.1f", 100 * ink / t; else print 0 }')
awk -v i="$ink" 'BEGIN { exit !(i + 0 >= 1.0) }' || fail "the screenshot is blank (${ink:-0}% ink)"
echo "check-html: $page renders: $rows cases, $svgs timelines, ${ink}% ink, screenshot $shot"
