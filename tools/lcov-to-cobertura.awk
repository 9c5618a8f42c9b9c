# Turns an lcov tracefile into Cobertura XML, the format CI coverage
# widgets read (GitLab's coverage_report, Jenkins, the GitHub coverage
# actions). One package per source directory, one class per file, one
# <line> per instrumented line with its hit count and, where the line has
# branches, how many of them were taken.
#
# Usage: awk -v top=/abs/checkout/ -f tools/lcov-to-cobertura.awk total.info > cobertura.xml
# (top: the prefix stripped from SF: paths, with its trailing slash)

function xml(s) {
    gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); gsub(/>/, "\\&gt;", s); gsub(/"/, "\\&quot;", s)
    return s
}
function rate(h, n) { return n ? sprintf("%.4f", h / n) : "1.0000" }

/^SF:/ {
    file = substr($0, 4)
    if (index(file, top) == 1)
        file = substr(file, length(top) + 1)
    nlines = 0; fl_h = 0; fl_n = 0; fb_h = 0; fb_n = 0
    delete hits; delete order; delete br_n; delete br_h
    next
}
/^DA:/ {
    split(substr($0, 4), a, ",")
    if (!(a[1] in hits)) order[++nlines] = a[1]
    hits[a[1]] += a[2]
    next
}
/^BRDA:/ {
    split(substr($0, 6), a, ",")
    br_n[a[1]]++
    if (a[4] != "-" && a[4] > 0) br_h[a[1]]++
    next
}
/^end_of_record/ {
    pkg = file; sub(/\/[^\/]*$/, "", pkg); if (pkg == file) pkg = "."
    cls = file; sub(/.*\//, "", cls)
    body = ""
    for (i = 1; i <= nlines; i++) {
        l = order[i]
        fl_n++; if (hits[l] > 0) fl_h++
        if (l in br_n) {
            t = br_h[l] + 0; n = br_n[l]
            fb_n += n; fb_h += t
            body = body sprintf("          <line number=\"%d\" hits=\"%.0f\" branch=\"true\" condition-coverage=\"%d%% (%d/%d)\"/>\n", l, hits[l], int(100 * t / n), t, n)
        } else {
            body = body sprintf("          <line number=\"%d\" hits=\"%.0f\" branch=\"false\"/>\n", l, hits[l])
        }
    }
    if (!(pkg in pkg_seen)) { pkg_seen[pkg] = 1; pkgs[++npkgs] = pkg }
    # (mawk limits one sprintf to 8 KiB: the body is appended, not formatted)
    classes[pkg] = classes[pkg] sprintf("      <class name=\"%s\" filename=\"%s\" line-rate=\"%s\" branch-rate=\"%s\" complexity=\"0\">\n        <methods/>\n        <lines>\n", xml(cls), xml(file), rate(fl_h, fl_n), rate(fb_h, fb_n)) body "        </lines>\n      </class>\n"
    p_lh[pkg] += fl_h; p_ln[pkg] += fl_n; p_bh[pkg] += fb_h; p_bn[pkg] += fb_n
    t_lh += fl_h; t_ln += fl_n; t_bh += fb_h; t_bn += fb_n
    next
}
END {
    srand(); now = srand() # the previous seed: the time of day, in any awk
    print "<?xml version=\"1.0\" ?>"
    print "<!DOCTYPE coverage SYSTEM \"http://cobertura.sourceforge.net/xml/coverage-04.dtd\">"
    printf "<coverage line-rate=\"%s\" branch-rate=\"%s\" lines-covered=\"%.0f\" lines-valid=\"%.0f\" branches-covered=\"%.0f\" branches-valid=\"%.0f\" complexity=\"0\" version=\"pgfault\" timestamp=\"%.0f\">\n", rate(t_lh, t_ln), rate(t_bh, t_bn), t_lh, t_ln, t_bh, t_bn, now
    printf "  <sources>\n    <source>%s</source>\n  </sources>\n  <packages>\n", xml(top == "" ? "." : top)
    for (i = 1; i <= npkgs; i++) {
        p = pkgs[i]
        printf "    <package name=\"%s\" line-rate=\"%s\" branch-rate=\"%s\" complexity=\"0\">\n      <classes>\n", xml(p), rate(p_lh[p], p_ln[p]), rate(p_bh[p], p_bn[p])
        printf "%s", classes[p]
        printf "      </classes>\n    </package>\n"
    }
    print "  </packages>"
    print "</coverage>"
}
