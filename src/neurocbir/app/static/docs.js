// Starts Swagger UI on /docs from this server's own files (a script file: the page allows no inline script).
window.onload = () => {
  window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
};
