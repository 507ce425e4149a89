// A real OpenID Connect provider for the tests (panva's certified oidc-provider), with the
// development login pages: any user name signs in; a name starting "admin", "clinician" or
// "curator" gets that role, any other "reader". Access tokens are JWTs for the audience
// "urn:neurocbir:api", carrying the roles.
//   node provider.mjs PORT REDIRECT_URI
import Provider from "oidc-provider";

const [port, redirect] = [Number(process.argv[2]), process.argv[3]];
const roleOf = (id) => ["admin", "clinician", "curator"].find((r) => id.startsWith(r)) || "reader";
const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{
    client_id: "neurocbir",
    token_endpoint_auth_method: "none",
    redirect_uris: [redirect],
    grant_types: ["authorization_code"],
    response_types: ["code"],
  }],
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, preferred_username: id, roles: [roleOf(id)] }),
  }),
  claims: { openid: ["sub"], profile: ["preferred_username", "roles"] },
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => "urn:neurocbir:api",
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({ scope: "openid profile", audience: "urn:neurocbir:api", accessTokenFormat: "jwt" }),
    },
  },
  extraTokenClaims: async (ctx, token) => ({ roles: [roleOf(token.accountId)] }),
  ttl: { AccessToken: 600, IdToken: 600, Session: 600, Interaction: 600, Grant: 600 },
});
provider.listen(port, "127.0.0.1", () => console.log(`oidc-provider listening on ${port}`));
