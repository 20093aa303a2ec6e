// Infinite scroll: when the "More images" link comes into view, fetch that page, append its
// cards and take over its next link. Without JavaScript the link works as it is.
(function () {
  "use strict";
  var grid = document.querySelector(".grid");
  var next = document.querySelector("a.next");
  if (!grid || !next || !("IntersectionObserver" in window) || !window.fetch) return;
  var loading = false;
  var observer = new IntersectionObserver(function (entries) {
    if (!entries.some(function (e) { return e.isIntersecting; }) || loading) return;
    loading = true;
    fetch(next.href, { headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (text) {
        var page = new DOMParser().parseFromString(text, "text/html");
        page.querySelectorAll(".grid .card").forEach(function (card) {
          grid.appendChild(document.importNode(card, true));
        });
        var further = page.querySelector("a.next");
        if (further) {
          next.href = further.getAttribute("href");
          // Observing again reports at once, so a link still in view loads the page after.
          observer.unobserve(next);
          loading = false;
          observer.observe(next);
          return;
        } else {
          observer.disconnect();
          next.parentNode.removeChild(next);
        }
        loading = false;
      })
      .catch(function () {
        observer.disconnect();  // leave the plain link for the reader to follow
        loading = false;
      });
  }, { rootMargin: "600px" });
  observer.observe(next);
})();
