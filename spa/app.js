// The flask-obo sample SPA: sign in with MSAL.js (msal-browser, redirect flow), then call
// the API cross-origin with the access token: GET /api/me and /api/me/manager, which the
// API answers by calling Microsoft Graph on the user's behalf (On-Behalf-Of).
//
// config.json comes from whoever serves this folder (scripts/serve_spa.py under make run,
// nginx under docker compose): authority, knownAuthorities, clientId, apiBaseUrl, apiScope,
// redirectUri.
//
// What the API may answer, and what this page does:
//   401 insufficient_claims  a Conditional Access challenge (e.g. MFA) met by the API's
//                            OBO: decode `claims` from WWW-Authenticate, get a token again
//                            with those claims (interactive), retry once.
//   403 consent_required     the user (or an admin) has not consented: say so.
//   404 manager_not_found    /api/me/manager: "No manager".

const msal = window.msal;
const CLAIMS_STATE = "claims-challenge"; // the redirect came back from a claims challenge

const $ = (id) => document.getElementById(id);

/** An API error: the JSON body's error and error_description, and the response. */
class ApiError extends Error {
  constructor(response, body) {
    super(body?.error_description || `The API answered ${response.status}.`);
    this.status = response.status;
    this.error = body?.error || "";
    this.response = response;
  }
}

/** The claims JSON of a `WWW-Authenticate: Bearer ..., claims="<base64>"` header, or null. */
export function claimsFromWwwAuthenticate(header) {
  const match = /\bclaims="([^"]*)"/.exec(header || "");
  if (!match) return null;
  let b64 = match[1].replace(/-/g, "+").replace(/_/g, "/");
  b64 += "=".repeat((4 - (b64.length % 4)) % 4);
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

function show(state, status) {
  $("signed-out").hidden = state !== "signed-out";
  $("signed-in").hidden = state !== "signed-in";
  $("status").textContent = status;
}

function message(text) {
  $("message").textContent = text;
}

async function main() {
  const response = await fetch("config.json", { cache: "no-store" });
  if (!response.ok) throw new Error(`config.json: ${response.status}`);
  const config = await response.json();
  const scopes = [config.apiScope];
  const pca = new msal.PublicClientApplication({
    auth: {
      clientId: config.clientId,
      authority: config.authority,
      knownAuthorities: config.knownAuthorities,
      redirectUri: config.redirectUri,
      postLogoutRedirectUri: config.redirectUri,
      navigateToLoginRequestUrl: false,
    },
    cache: { cacheLocation: "sessionStorage" },
  });
  await pca.initialize();

  $("sign-in").addEventListener("click", () => {
    message("");
    pca.loginRedirect({ scopes, prompt: "select_account" }).catch((e) => message(e.message));
  });
  $("sign-out").addEventListener("click", () => signOut(pca, config, scopes));

  let result = null;
  try {
    result = await pca.handleRedirectPromise(); // back from the dev tenant (or Entra ID)?
  } catch (error) {
    message(`Sign-in failed: ${error.errorMessage || error.message}`);
  }
  const account = result?.account || pca.getActiveAccount() || pca.getAllAccounts()[0];
  if (!account) {
    show("signed-out", "You are signed out.");
    return;
  }
  pca.setActiveAccount(account);
  show("signed-in", `Account: ${account.username}`);

  const api = {
    // A token from a claims challenge's redirect is used as is; else from MSAL's cache.
    token: result?.state === CLAIMS_STATE ? result.accessToken : null,
    claimsRetried: result?.state === CLAIMS_STATE, // retry once: no second challenge
  };
  const call = (path) => callApi(pca, config, scopes, account, api, path);
  try {
    const me = await call("/api/me");
    $("me").textContent = me.displayName;
    try {
      const manager = await call("/api/me/manager");
      $("manager").textContent = manager.displayName;
    } catch (error) {
      if (error.error !== "manager_not_found") throw error;
      $("manager").textContent = "No manager";
    }
  } catch (error) {
    if (error.redirecting) return;
    $("me").textContent = $("manager").textContent = "—";
    if (error.error === "consent_required") {
      message("The API cannot call Microsoft Graph for you: consent is missing. " +
              "Ask an administrator to grant consent for this application (consent_required).");
    } else {
      message(error.message);
    }
  }
}

async function accessToken(pca, scopes, account) {
  try {
    return (await pca.acquireTokenSilent({ scopes, account })).accessToken;
  } catch (error) {
    if (error instanceof msal.InteractionRequiredAuthError) {
      await pca.acquireTokenRedirect({ scopes, account }); // navigates away
      throw Object.assign(new Error("redirecting"), { redirecting: true });
    }
    throw error;
  }
}

/** GET an API path with the access token; the parsed JSON, or an ApiError. */
async function callApi(pca, config, scopes, account, api, path) {
  const token = api.token || (await accessToken(pca, scopes, account));
  const response = await fetch(config.apiBaseUrl + path, {
    headers: { Authorization: `Bearer ${token}` },
  });
  const body = await response.json().catch(() => null);
  if (response.ok) return body;
  const error = new ApiError(response, body);
  if (response.status === 401 && error.error === "insufficient_claims" && !api.claimsRetried) {
    const claims = claimsFromWwwAuthenticate(response.headers.get("WWW-Authenticate"));
    if (claims) {
      api.claimsRetried = true;
      show("signed-in", "The API asks for a stronger sign-in…");
      // Interactive, with the claims: the tenant steps up (MFA); the page comes back with
      // state CLAIMS_STATE and main() retries with the new token.
      await pca.acquireTokenRedirect({ scopes, account, claims, state: CLAIMS_STATE });
      throw Object.assign(new Error("redirecting"), { redirecting: true });
    }
  }
  throw error;
}

async function signOut(pca, config, scopes) {
  const account = pca.getActiveAccount();
  // Drop the tokens the API cached for this user (their downstream tokens), if the API
  // has DELETE /api/me/token-cache: the next sign-in then makes a new OBO.
  try {
    const { accessToken: token } = await pca.acquireTokenSilent({ scopes, account });
    await fetch(`${config.apiBaseUrl}/api/me/token-cache`, {
      method: "DELETE",
      headers: { Authorization: `Bearer ${token}` },
    });
  } catch (error) {
    console.warn("Could not clear the API's token cache:", error);
  }
  await pca.logoutRedirect({ account, postLogoutRedirectUri: config.redirectUri });
}

main().catch((error) => {
  show("signed-out", "Something went wrong.");
  message(error.message);
});
