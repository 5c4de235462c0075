// Live tail of a user's page: polls the JSON API and adds new entries on top.
// Log text is untrusted: every value goes in through textContent, never as HTML.
"use strict";
(function () {
  const live = document.getElementById("live");
  const timeline = document.getElementById("timeline");
  if (!live || !timeline) return;
  const user = live.dataset.user;
  let after = live.dataset.after || "";
  const shown = new Set(Object.keys(live.dataset).filter((k) => k.startsWith("stream")).map((k) => live.dataset[k]));

  function entry(item) {
    const article = document.createElement("article");
    const slug = item.stream.replace(/ /g, "_");
    article.className = "entry s-" + slug;
    if (item.stream === "SECURITY ALERT" || item.stream === "STRANGE ACTIVITY") article.classList.add("alert");
    const header = document.createElement("header");
    const time = document.createElement("time");
    time.textContent = item.ts ? item.ts.replace("T", " ").replace("+00:00", " UTC") : "";
    const stream = document.createElement("span");
    stream.className = "stream";
    stream.textContent = item.stream;
    header.append(time, " ", stream);
    const pre = document.createElement("pre");
    pre.textContent = item.text;
    article.append(header, pre);
    return article;
  }

  async function poll() {
    try {
      const url = "/api/tail?user=" + encodeURIComponent(user) + "&after=" + encodeURIComponent(after);
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.ok) {
        const body = await response.json();
        after = body.after;
        for (const item of body.entries) {
          if (shown.size && !shown.has(item.stream)) continue;
          timeline.prepend(entry(item));
          live.textContent = "live: last entry " + (item.ts || "");
          live.classList.add("fresh");
        }
      }
    } catch (e) {
      live.textContent = "live: the server did not answer; retrying";
    }
    setTimeout(poll, 2000);
  }
  setTimeout(poll, 2000);
})();
