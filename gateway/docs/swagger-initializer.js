// Starts Swagger UI on the gateway's /docs page (a file of its own: the page's
// Content-Security-Policy forbids inline scripts).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // Every tag open with its operations listed; an operation's details open on a click.
    docExpansion: "list",
    // No calls to the public validator service: the page talks to this gateway only.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
