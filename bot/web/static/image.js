// "Copy as /imagine": puts the exact prompt text that reproduces the image on the clipboard.
(function () {
  "use strict";
  var button = document.getElementById("copy-command");
  var code = document.getElementById("imagine-command");
  if (!button || !code) return;
  button.addEventListener("click", function () {
    var text = code.textContent;
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy as /imagine"; }, 2000);
    };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(done, function () { select(code); });
    } else {
      select(code);
    }
  });
  function select(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Press Ctrl+C to copy";
  }
})();
