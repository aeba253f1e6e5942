// Types of scripts/version.mjs, for the tests.
export declare function versionProblems(root?: string): string[];
export declare function nextVersion(current: string, how: string): string;
export declare function bump(how: string, today?: string, root?: string): string;
