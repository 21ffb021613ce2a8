// imagen web: the header says whether the live refresh still gets answers.
// htmx keeps polling after a failed request and leaves the last good table in place,
// so without this a stopped server or an expired token would look like a quiet queue.
document.addEventListener("htmx:afterRequest", function (event) {
  var live = document.querySelector(".live");
  if (!live) {
    return;
  }
  var ok = event.detail.successful;
  var status = event.detail.xhr ? event.detail.xhr.status : 0;
  live.classList.toggle("offline", !ok);
  live.textContent = ok ? "live" : "offline: " + (status ? "HTTP " + status : "no answer");
});
